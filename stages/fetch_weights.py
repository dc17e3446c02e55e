"""Stage fetch-weights: the base GPT-2 weights, pretrained (downloaded) or seeded random."""

from gpt2_classifier.core.files import atomic_dir, sha256_file, write_json
from gpt2_classifier.core.params import Params
from gpt2_classifier.core.paths import BASE
from gpt2_classifier.core.stage import run_stage
from gpt2_classifier.model.pretrained import CONFIG_FILE, REFETCH, WEIGHTS_FILE, check_checkpoint, fetch_pretrained


def main(params: Params) -> None:
    m = params.model
    cfg = m.gpt_config()
    with atomic_dir(BASE) as tmp:
        weights = tmp / WEIGHTS_FILE
        if m.weights == "random":
            from gpt2_classifier.model.weights import random_model, save_hf  # torch: for random weights only

            save_hf(random_model(cfg, m.seed), weights)
            source = f"random (seed {m.seed})"
        else:
            source = fetch_pretrained(m.name, weights, m.revision, m.source, deadline=m.deadline)
            fix = "point model.source at GPT-2 weights in safetensors" if m.source else REFETCH
            check_checkpoint(weights, cfg, m.name, shown=source, fix=fix)
        architecture = {k: v for k, v in cfg.to_dict().items() if k != "drop_rate"}
        info = {
            "name": m.name,
            "weights": m.weights,
            "source": source,
            "sha256": sha256_file(weights),
            "revision": m.revision,
            "seed": m.seed,
        }
        write_json(tmp / CONFIG_FILE, {**info, "gpt": architecture})
    print(f"fetch-weights: {m.name} from {source} -> {BASE / WEIGHTS_FILE}")


if __name__ == "__main__":
    run_stage(main)
