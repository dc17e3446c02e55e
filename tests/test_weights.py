"""Loading and fetching checkpoints in the published layout, refusing bad ones."""

import contextlib
import dataclasses
import hashlib
import math
import shutil
import subprocess
import sys
import time
import weakref

import pytest
import torch
from conftest import send_slowly
from test_model import transformers_checkpoint

from gpt2_classifier.core.config import GPTConfig
from gpt2_classifier.core.errors import PipelineError, WeightsError
from gpt2_classifier.model import weights
from gpt2_classifier.model.classifier import replace_head
from gpt2_classifier.model.gpt import GPTModel
from gpt2_classifier.model.lora import LinearWithLoRA, add_lora
from gpt2_classifier.model.pretrained import check_checkpoint, fetch_pretrained
from gpt2_classifier.model.weights import load_model, random_model, save_hf

CFG = GPTConfig(emb_dim=32, n_layers=2, n_heads=2, context_length=64)
REPO_PATH = "/openai-community/gpt2/resolve/main/model.safetensors"
COMMIT = "a" * 40
COMMIT_PATH = f"/openai-community/gpt2/resolve/{COMMIT}/model.safetensors"  # the file at the commit HEAD names
DEADLINE = 600.0


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    reference = transformers_checkpoint(folder, CFG)
    return folder / "model.safetensors", reference


def logits_match(ours, reference) -> bool:
    tokens = torch.randint(0, CFG.vocab_size, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return bool((ours.eval()(tokens) - reference(tokens).logits).abs().max() < 1e-4)


def serve_hub(server, body: bytes, etag: str | None = None):
    headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{etag or hashlib.sha256(body).hexdigest()}"'}
    server.serve(REPO_PATH, body, headers=headers)
    server.serve(COMMIT_PATH, body, headers=headers)
    return server.url


def test_fetch_from_a_hub_endpoint_loads_and_matches_transformers(server, checkpoint, tmp_path):
    path, reference = checkpoint
    endpoint = serve_hub(server, path.read_bytes())
    dest = tmp_path / "base" / "model.safetensors"
    source = fetch_pretrained("gpt2-small", dest, "main", endpoint=endpoint, deadline=DEADLINE)
    assert source == f"{endpoint}/openai-community/gpt2@{COMMIT}"
    assert dest.read_bytes() == path.read_bytes()
    assert [p.name for p in (tmp_path / "base").iterdir()] == ["model.safetensors"]  # nothing left beside it
    assert logits_match(load_model(CFG, dest), reference)
    assert [(method, p) for method, p, _ in server.requests] == [("HEAD", REPO_PATH), ("GET", COMMIT_PATH)]


def test_loading_onto_a_device_holds_one_tensor_in_host_memory_at_a_time(checkpoint, monkeypatch):
    """A model bound for a GPU goes there tensor by tensor: gpt2-xl never sits whole (6.4 GB) in host memory."""
    path, _ = checkpoint
    read, opened = [], weights.open_tensors

    @contextlib.contextmanager
    def watched(*args, **kwargs):
        with opened(*args, **kwargs) as f:

            class Reader:
                def keys(self):
                    return f.keys()

                def get_tensor(self, name):
                    assert all(ref() is None for ref in read), "an earlier tensor is still in host memory"
                    read.append(weakref.ref(tensor := f.get_tensor(name)))
                    return tensor

            yield Reader()

    monkeypatch.setattr(weights, "open_tensors", watched)
    model = load_model(CFG, path, "meta")  # a device without memory: only the shapes arrive
    assert len(read) == len(weights.hf_layout(CFG)) and all(p.is_meta for p in model.parameters())
    assert model.out_head.weight is model.tok_emb.weight


def test_loading_skips_the_initialisation_and_imports_no_compiler(tmp_path):
    """load_model builds the model on the meta device without torch.nn.init's fills (on meta, normal_ runs
    a Python reference that imports torch._dynamo: bench/README.md, bench_load.py); what it holds
    afterwards is the file's tensors, bit for bit, every parameter and buffer on the CPU."""
    save_hf(random_model(CFG, 0), tmp_path / "model.safetensors")
    code = (
        "import sys, torch\nfrom gpt2_classifier.core.config import GPTConfig\n"
        "from gpt2_classifier.model.weights import load_model\n"
        f"model = load_model(GPTConfig(**{dataclasses.asdict(CFG)!r}), sys.argv[1])\n"
        "devices = {str(t.device) for t in [*model.parameters(), *model.buffers()]}\n"
        "print('torch._dynamo' in sys.modules, sorted(devices))"
    )
    out = subprocess.run([sys.executable, "-c", code, tmp_path / "model.safetensors"], capture_output=True, text=True)
    assert out.stdout.split("\n")[0] == "False ['cpu']", out.stderr

    loaded, expected = load_model(CFG, tmp_path / "model.safetensors"), random_model(CFG, 0)
    assert all(not t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    for name, tensor in expected.state_dict().items():
        if name != "out_head.weight":  # tied to the token embedding when loaded
            assert torch.equal(loaded.state_dict()[name], tensor), name
    assert torch.nn.init.normal_(torch.zeros(4)).any()  # the fills work again outside load_model


def test_the_hub_download_sends_the_users_token(server, checkpoint, tmp_path, monkeypatch):
    path, _ = checkpoint
    monkeypatch.setenv("HF_TOKEN", "hf_for_a_private_mirror")
    endpoint = serve_hub(server, path.read_bytes())
    fetch_pretrained("gpt2-small", tmp_path / "model.safetensors", "main", endpoint=endpoint, deadline=DEADLINE)
    (get,) = [headers for method, _, headers in server.requests if method == "GET"]
    assert {k.lower(): v for k, v in get.items()}["authorization"] == "Bearer hf_for_a_private_mirror"


def test_hub_checksum_mismatch_is_refused(server, checkpoint, tmp_path):
    path, _ = checkpoint
    endpoint = serve_hub(server, path.read_bytes(), etag="0" * 64)
    with pytest.raises(WeightsError, match="has SHA-256 [0-9a-f]{64}, the Hub says 0000"):
        fetch_pretrained("gpt2-small", tmp_path / "model.safetensors", "main", endpoint=endpoint, deadline=DEADLINE)
    assert not (tmp_path / "model.safetensors").exists()


def test_unreachable_hub_names_it_and_the_offline_ways(tmp_path):
    with pytest.raises(
        WeightsError, match=r"http://127.0.0.1:9/openai-community/gpt2: could not download .* model.source"
    ):
        fetch_pretrained(
            "gpt2-small", tmp_path / "model.safetensors", "main", endpoint="http://127.0.0.1:9", deadline=1
        )
    with pytest.raises(WeightsError) as info:  # a mirror's credentials stay hidden, also in the reason
        fetch_pretrained(
            "gpt2-small", tmp_path / "model.safetensors", "main", endpoint="http://me:secret@127.0.0.1:9", deadline=1
        )
    assert str(info.value).startswith("http://***@127.0.0.1:9/openai-community/gpt2: could not download")
    assert "secret" not in str(info.value)


def trickle(body: bytes):
    """A route that answers HEAD at once and sends a GET's body a byte every 0.1 s: each read
    returns in time, the whole never ends."""

    def answer(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.send_header("X-Repo-Commit", COMMIT)
        handler.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
        handler.end_headers()
        if handler.command == "GET":
            send_slowly(handler, body[:100])

    return answer


@pytest.mark.parametrize("where", ["hub", "source"])
def test_a_trickling_weights_server_is_stopped_at_the_deadline(server, checkpoint, tmp_path, where):
    path, _ = checkpoint
    for route in (REPO_PATH, COMMIT_PATH, "/weights/model.safetensors"):
        server.routes[route] = trickle(path.read_bytes())
    if where == "hub":
        kwargs, shown = {"endpoint": server.url}, f"{server.url}/openai-community/gpt2: could not download"
    else:
        kwargs, shown = {"source": server.url + "/weights/model.safetensors"}, server.url + "/weights/model.safetensors"
    start = time.monotonic()
    with pytest.raises(PipelineError) as info:
        fetch_pretrained("gpt2-small", tmp_path / "base" / "model.safetensors", "main", deadline=1.5, **kwargs)
    assert time.monotonic() - start < 5  # not the 60 s a read may wait, nor the 10 s the trickle lasts
    message = str(info.value)
    assert message.startswith(shown) and "not done within 1.5 s (model.deadline)" in message, message
    assert "raise model.deadline" in message and ".fetch." not in message
    assert list((tmp_path / "base").iterdir()) == []  # nothing half-written is left
    assert sum(method == "GET" for method, _, _ in server.requests) == 1  # a deadline is not retried


def test_a_revision_the_hub_does_not_have_is_named(server, tmp_path):
    def missing(handler):
        handler.send_response(404)
        handler.send_header("X-Error-Code", "RevisionNotFound")
        handler.send_header("X-Error-Message", "Invalid rev id: v9")
        handler.end_headers()

    server.routes["/openai-community/gpt2/resolve/v9/model.safetensors"] = missing
    with pytest.raises(WeightsError) as info:
        fetch_pretrained("gpt2-small", tmp_path / "model.safetensors", "v9", endpoint=server.url, deadline=DEADLINE)
    assert str(info.value) == (
        f"{server.url}/openai-community/gpt2: no revision 'v9' (model.revision); give a branch, tag or commit "
        "of the repository, e.g. main"
    )


def test_a_model_source_that_is_missing_or_a_folder_without_weights_is_named(tmp_path):
    fix = "point it at a model.safetensors or the folder holding one, or set it to null to use the Hub"
    missing = tmp_path / "gpt2" / "model.safetensors"
    with pytest.raises(WeightsError) as info:
        fetch_pretrained("gpt2-small", tmp_path / "out.safetensors", "main", source=str(missing), deadline=DEADLINE)
    assert str(info.value) == f"{missing}: no such file (model.source); {fix}"
    with pytest.raises(WeightsError) as info:
        fetch_pretrained("gpt2-small", tmp_path / "out.safetensors", "main", source=str(tmp_path), deadline=DEADLINE)
    assert str(info.value) == f"{tmp_path}: a folder without model.safetensors (model.source); {fix}"


def test_local_folder_and_url_sources(server, checkpoint, tmp_path):
    path, reference = checkpoint
    dest = tmp_path / "from-folder.safetensors"
    fetch_pretrained("gpt2-small", dest, "main", source=str(path.parent), deadline=DEADLINE)
    assert logits_match(load_model(CFG, dest), reference)
    url = server.serve("/weights/model.safetensors", path.read_bytes())
    dest = tmp_path / "from-url.safetensors"
    fetch_pretrained("gpt2-small", dest, "main", source=url, deadline=DEADLINE)
    assert dest.read_bytes() == path.read_bytes()


def test_wrong_size_names_the_tensor_and_the_size_it_looks_like(checkpoint):
    path, _ = checkpoint
    with pytest.raises(
        WeightsError,
        match=r"'wte.weight' has shape \[50257, 32\], gpt2-small needs \[50257, 768\]; the file looks like an unknown",
    ):
        check_checkpoint(path, GPTConfig(), "gpt2-small")


def test_missing_and_extra_tensors_are_named(tmp_path):
    model = random_model(CFG, 0)
    save_hf(model, tmp_path / "ok.safetensors")
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "ok.safetensors")
    save_file({k: v for k, v in tensors.items() if k != "h.1.mlp.c_fc.bias"}, tmp_path / "missing.safetensors")
    save_file({**tensors, "h.1.attn.rotary": torch.zeros(2)}, tmp_path / "extra.safetensors")
    with pytest.raises(WeightsError, match="tensor 'h.1.mlp.c_fc.bias' is missing"):
        check_checkpoint(tmp_path / "missing.safetensors", CFG, "this model")
    with pytest.raises(WeightsError, match="unexpected tensor 'h.1.attn.rotary'"):
        check_checkpoint(tmp_path / "extra.safetensors", CFG, "this model")


def test_truncated_file_and_html_page_are_refused(checkpoint, tmp_path):
    path, _ = checkpoint
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    html = tmp_path / "html.safetensors"
    html.write_text("<!DOCTYPE html><html><body>Rate limited</body></html>")
    for bad in (truncated, html):
        with pytest.raises(WeightsError, match="not a readable safetensors file"):
            load_model(CFG, bad)


def test_random_weights_are_seeded_and_round_trip(tmp_path):
    a, b, c = random_model(CFG, 1), random_model(CFG, 1), random_model(CFG, 2)
    assert torch.equal(a.trf_blocks[0].att.qkv.weight, b.trf_blocks[0].att.qkv.weight)
    assert not torch.equal(a.trf_blocks[0].att.qkv.weight, c.trf_blocks[0].att.qkv.weight)
    save_hf(a, tmp_path / "model.safetensors")
    loaded = load_model(CFG, tmp_path / "model.safetensors")
    for name, tensor in a.state_dict().items():
        if name != "out_head.weight":  # the loaded head is tied to the token embedding
            assert torch.equal(loaded.state_dict()[name], tensor), name
    shutil.rmtree(tmp_path)


def test_seeded_initialisation_is_the_seeds_and_leaves_the_global_random_state_alone():
    """random_model, replace_head and add_lora draw from their seed as `torch.manual_seed(seed)` then the
    same construction would, and PyTorch's global random state afterwards is what it was before."""
    torch.manual_seed(1234)
    torch.rand(5)  # a state that no seed gives
    before = torch.get_rng_state()
    gpus_before = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    model = random_model(CFG, 7)
    base = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    replace_head(model, 2, seed=3)
    add_lora(model, rank=2, alpha=4.0, seed=5)
    assert torch.equal(torch.get_rng_state(), before)
    assert all(map(torch.equal, torch.cuda.get_rng_state_all() if gpus_before else [], gpus_before))

    torch.manual_seed(7)
    assert all(torch.equal(base[name], tensor) for name, tensor in GPTModel(CFG).state_dict().items())
    torch.manual_seed(3)
    head = torch.nn.Linear(CFG.emb_dim, 2)
    assert torch.equal(model.out_head.weight, head.weight) and torch.equal(model.out_head.bias, head.bias)
    torch.manual_seed(5)
    adapters = [module for module in model.modules() if isinstance(module, LinearWithLoRA)]
    assert len(adapters) == 4 * CFG.n_layers
    for adapter in adapters:  # each adapter's A, in the order add_lora makes them
        a = torch.nn.init.kaiming_uniform_(torch.empty(adapter.base.in_features, 2), a=math.sqrt(5))
        assert torch.equal(adapter.A, a)


def test_fetch_weights_errors_name_the_users_source(tmp_path, checkpoint):
    import yaml
    from conftest import PROJECT, run_seeing_imports

    path, _ = checkpoint  # a GPT-2 of emb_dim 32, not gpt2-small
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(path.read_bytes()[:1000])
    for source, expected in ((truncated, "not a readable safetensors file"), (path, "has shape [50257, 32]")):
        params = {"data": {"url": "unused"}, "model": {"source": str(source)}}
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        # Pretrained weights are fetched and checked without torch.
        script = PROJECT / "stages" / "fetch_weights.py"
        result, imported = run_seeing_imports(script, tmp_path, ["torch"], check=False)
        assert result.returncode == 1 and imported == set()
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith(f"error: {source}: ") and expected in line, line
        assert line.endswith("point model.source at GPT-2 weights in safetensors"), line
        assert ".tmp" not in line and ".fetch." not in line  # never a temporary path
        assert not (tmp_path / "models" / "base").exists()


def test_a_hub_that_trickles_its_headers_is_stopped_at_the_deadline(server, tmp_path):
    # The Hub's client bounds each read of its metadata request, not the whole answer: headers sent a byte
    # every 0.1 s would hold it as long as the server likes. model.deadline bounds it too.
    def headers_forever(handler):
        send_slowly(handler, b"HTTP/1.1 200 OK\r\nX-Padding: " + b"x" * 100, pause=0.05)

    server.routes[REPO_PATH] = headers_forever
    start = time.monotonic()
    with pytest.raises(WeightsError) as info:
        fetch_pretrained("gpt2-small", tmp_path / "model.safetensors", "main", endpoint=server.url, deadline=1.5)
    assert time.monotonic() - start < 4  # not the 10 s the trickle lasts
    message = str(info.value)
    assert message.startswith(f"{server.url}/openai-community/gpt2: could not download") and "model.deadline" in message
    assert not (tmp_path / "model.safetensors").exists()
