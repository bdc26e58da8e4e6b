"""Check that a `gpt2 convert ... --to hf` folder opens in transformers as people use it:
`AutoTokenizer.from_pretrained(folder)` and `pipeline("text-generation", model=folder)`.

Needs torch + transformers (the fixtures' throw-away venv, see make_fixtures.py)::

    gpt2 convert shakespeare /tmp/hf --to hf
    ../peer/bin/python scripts/check_hf_export.py /tmp/hf "ROMEO:" --new-tokens 20

Prints one JSON object: the ids of "hello world", and the pipeline's greedy continuation of the
prompt (compare it with `gpt2 generate PROMPT -m SOURCE -n N`, greedy by default).
"""

from __future__ import annotations

import argparse
import json

from transformers import AutoTokenizer, pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("prompt")
    parser.add_argument("--new-tokens", type=int, default=20)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.folder)
    generator = pipeline("text-generation", model=args.folder)
    out = generator(
        args.prompt, max_new_tokens=args.new_tokens, do_sample=False, return_full_text=False
    )
    result = {
        "hello world": tokenizer("hello world").input_ids,
        "tokenizer": type(tokenizer).__name__,
        "continuation": out[0]["generated_text"],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
