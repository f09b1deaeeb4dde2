"""Run the release's *remote code* on the inputs ``reward verify`` prepared; save the first-token logits.

This file runs in the user's *other* Python environment, the one with a transformers old enough for
THUDM's modeling_cogvlm.py (about 4.40-4.43). It imports only torch, PIL and transformers (not this
project), so it can be run from a copy::

    /path/to/old-env/bin/python remote_runner.py --model PATH --inputs in.pt --out out.pt

For every sample and query it builds the prompt with the checkpoint's own
``build_conversation_input_ids`` (the release's template, token layout and pixel preprocessing),
runs one forward, and saves the token ids, token types and the logits at the last position.
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--inputs", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=dtype, trust_remote_code=True)
    model = model.eval().to(args.device)
    data = torch.load(args.inputs, weights_only=True)
    results = []
    for item in data["items"]:
        media = item["media"]
        if item["modality"] == "video":  # [C, T, H, W] uint8, as decord's torch bridge gives it
            visual = media
        else:
            from PIL import Image

            visual = Image.fromarray(media.permute(1, 2, 0).numpy())
        for query in item["queries"]:
            built = model.build_conversation_input_ids(
                tokenizer, query=query, history=[], images=[visual], template_version=data["template"]
            )
            inputs = {
                "input_ids": built["input_ids"][None].to(args.device),
                "token_type_ids": built["token_type_ids"][None].to(args.device),
                "attention_mask": built["attention_mask"][None].to(args.device),
                "images": [[built["images"][0].to(args.device).to(dtype)]],
            }
            with torch.no_grad():
                logits = model(**inputs).logits[0, -1].float().cpu()
            results.append(
                {
                    "input_ids": built["input_ids"].cpu(),
                    "token_type_ids": built["token_type_ids"].cpu(),
                    "logits": logits,
                }
            )
    torch.save(results, args.out)


if __name__ == "__main__":
    main()
