"""What finetune predicts and evaluate measures: the predictions files, classification metrics and
plots. numpy, no torch."""
