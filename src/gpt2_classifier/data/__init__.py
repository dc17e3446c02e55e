"""The data stages' work: fetch (download, archive), read each data.format (readers), balance and
split (messages), and encode with GPT-2's BPE (tokenizer, encode). numpy, no torch."""
