"""Generate the golden test fixtures in ``tests/fixtures/`` from Hugging Face transformers + PyTorch.

This script is NOT part of the package and needs torch + transformers, which the project does not
depend on. Run it from the repository root with a separate, throw-away virtual environment::

    python3 -m venv ../peer
    ../peer/bin/pip install torch==2.13.0 transformers safetensors
    ../peer/bin/python scripts/make_fixtures.py

Options:
    --out DIR         where to write the fixtures (default: tests/fixtures)
    --tokenizer DIR   folder with GPT-2 ``vocab.json`` + ``merges.txt``
                      (default: gpt2cli/assets, the same bytes as ../shared/gpt2-tokenizer)
    --bench-dir DIR   also write a random-init GPT-2 124M Hugging Face folder (config.json,
                      model.safetensors, vocab.json, merges.txt) to DIR (not committed; ~500 MB)

Everything is deterministic (fixed torch seeds, CPU, one thread). Models are built from configs with
random init (the Hub is never contacted). Parameters are stored as float32; every reference number is
computed in float64 from exactly those stored float32 weights (loaded back from the written
safetensors file), and the float32-vs-float64 differences are recorded in golden.json.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import numpy as np
import safetensors.numpy
import tokenizers
import torch
import transformers
from safetensors.torch import load_file
from tokenizers import ByteLevelBPETokenizer
from transformers import GPT2Config, GPT2LMHeadModel

EOT = 50256
MAX_NEW_TOKENS = 20
# seeds picked (out of 0..11) for the largest smallest top1-top2 margin over all greedy steps, so
# that float32 / TF32 round-off elsewhere cannot flip a greedy token
SEED_A = 8
SEED_B = 11

TINY_A_LOGITS_TEXT = "The quick brown fox jumps over"
TINY_A_PROMPTS = [
    "Hello, world",
    "The capital of France is Paris and",
    "Once upon a time, in a small village, there lived",
]
EVAL_TEXT = (
    "The river ran slowly through the valley, past the old mill and the stone bridge that the "
    "villagers had built more than two hundred years ago. In the spring, when the snow melted in "
    "the mountains, the water rose and covered the low fields, and the children would stand on the "
    "bridge to watch branches and leaves float by. The miller, a tall man with a grey beard, kept "
    "a careful record of every flood in a leather notebook. He wrote down the date, the height of "
    "the water, and the names of the families who had to leave their homes. Over the years the "
    "notebook grew thick, and people from the town came to read it when they wanted to know "
    "whether a new house would be safe. Nobody remembers exactly when the mill stopped working, "
    "but the notebook is still kept in the library, and on quiet afternoons a student sometimes "
    "opens it and reads the careful handwriting aloud. "
    "The bell rang twice before anyone answered the door, and the rain kept falling all night."
)
PPL_WINDOW = 32
PPL_STRIDES = (32, 16)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def load_tokenizer(tok_dir: Path) -> tokenizers.Tokenizer:
    tok = ByteLevelBPETokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"))
    tok.add_special_tokens(["<|endoftext|>"])
    got = tok.encode("Hello world").ids
    assert got == [15496, 995], got
    got = tok.encode("<|endoftext|>").ids
    assert got == [EOT], got
    assert tok.get_vocab_size() == 50257, tok.get_vocab_size()
    return tok


def finish_folder(folder: Path, tok_dir: Path | None) -> None:
    """Copy the tokenizer files in (as plain 0644 files) and make every file 0644."""
    if tok_dir is not None:
        for fname in ("vocab.json", "merges.txt"):
            dst = folder / fname
            dst.unlink(missing_ok=True)
            shutil.copyfile(tok_dir / fname, dst)
    for f in folder.iterdir():
        f.chmod(0o644)


def reinit_(model: GPT2LMHeadModel, gen: torch.Generator) -> None:
    """Re-initialise every parameter so biases and LayerNorm gains/biases are non-trivial."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith(".weight") and name.split(".")[-2].startswith("ln_"):
                p.copy_(1.0 + 0.1 * noise)  # LayerNorm gain
            elif name.endswith(".bias"):
                p.copy_(0.05 * noise)
            else:
                p.copy_(0.1 * noise)  # wte, wpe, c_attn, c_proj, c_fc


def reference_models(
    config: GPT2Config, state: dict[str, torch.Tensor]
) -> tuple[GPT2LMHeadModel, GPT2LMHeadModel]:
    """float32 and float64 eval-mode models holding exactly the given float32 weights."""
    out = []
    for dtype in (torch.float32, torch.float64):
        torch.manual_seed(0)
        m = GPT2LMHeadModel._from_config(config, attn_implementation="eager")
        assert m.config._attn_implementation == "eager"
        state = {
            k if k.startswith("transformer.") else f"transformer.{k}": v for k, v in state.items()
        }
        missing, unexpected = m.load_state_dict(state, strict=False)
        # tied lm_head is not stored; attn.bias / masked_bias buffers are not module state in tf5
        assert all(k == "lm_head.weight" for k in missing), missing
        assert all(k.endswith((".attn.bias", ".attn.masked_bias")) for k in unexpected), unexpected
        m.tie_weights()
        m = m.to(dtype).eval()
        assert torch.equal(m.lm_head.weight, m.transformer.wte.weight)
        out.append(m)
    return out[0], out[1]


@torch.no_grad()
def logits_of(model: GPT2LMHeadModel, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


@torch.no_grad()
def greedy(model: GPT2LMHeadModel, prompt: list[int]) -> tuple[np.ndarray, torch.Tensor]:
    """Greedy continuation (KV cache) of exactly MAX_NEW_TOKENS tokens and raw per-step logits."""
    ids = torch.tensor([prompt], dtype=torch.long)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        use_cache=True,
        max_new_tokens=MAX_NEW_TOKENS,
        min_new_tokens=MAX_NEW_TOKENS,
        pad_token_id=EOT,
        eos_token_id=None,
        return_dict_in_generate=True,
        output_logits=True,
    )
    seq = out.sequences[0, len(prompt) :].numpy()
    assert seq.shape == (MAX_NEW_TOKENS,), seq.shape
    assert len(out.logits) == MAX_NEW_TOKENS
    step_logits = torch.stack([lg[0] for lg in out.logits])  # [steps, vocab]
    # the raw logits are what a no-cache full forward pass gives at each last position
    assert torch.equal(torch.from_numpy(seq), step_logits.argmax(-1))
    return seq, step_logits


@torch.no_grad()
def sliding_window_nll(
    model: GPT2LMHeadModel, ids: list[int], window: int, stride: int
) -> tuple[float, int, float]:
    """HF perplexity-guide sliding window; returns (sum_nll, n_scored, sum of HF window losses)."""
    ids_t = torch.tensor(ids, dtype=torch.long)
    n = len(ids)
    prev_end = 0
    sum_nll = 0.0
    n_tok = 0
    hf_check = 0.0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        trg_len = end - prev_end
        inp = ids_t[begin:end][None]
        labels = inp.clone()
        labels[:, :-trg_len] = -100
        logits = model(input_ids=inp).logits.to(torch.float64)
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        tgt = labels[:, 1:]
        mask = tgt != -100
        tok_nll = -logp.gather(-1, tgt.clamp_min(0)[..., None])[..., 0]
        window_sum = float(tok_nll[mask].sum())
        window_n = int(mask.sum())
        sum_nll += window_sum
        n_tok += window_n
        if window_n:
            loss = model(input_ids=inp, labels=labels).loss
            hf_check += float(loss) * window_n
        prev_end = end
        if end == n:
            break
    return sum_nll, n_tok, hf_check


@torch.no_grad()
def inside(model: GPT2LMHeadModel, ids: torch.Tensor, name: str, lens: dict) -> None:
    """What the lens tests compare with: transformers' hidden states and attentions, and the
    last block's output, which hidden_states lacks (its last entry has ln_f applied)."""
    last: list[torch.Tensor] = []
    hook = model.transformer.h[-1].register_forward_hook(lambda mod, args, out: last.append(out))
    out = model(input_ids=ids, output_hidden_states=True, output_attentions=True)
    hook.remove()
    block_out = last[0][0] if isinstance(last[0], tuple) else last[0]
    lens[f"{name}/hidden_states"] = f32(torch.stack(out.hidden_states))  # [L + 1, B, T, D]
    lens[f"{name}/last_block_out"] = f32(block_out)  # [B, T, D]
    lens[f"{name}/attentions"] = f32(torch.stack(out.attentions))  # [L, B, H, T, T]


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.to(torch.float64) - b.to(torch.float64)).abs().max())


def f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).numpy().astype(np.float32)


def i32(x) -> np.ndarray:
    return np.asarray(x, dtype=np.int32)


# --------------------------------------------------------------------------------------------
# tiny-a: transformers-5 save_pretrained layout, real GPT-2 vocab
# --------------------------------------------------------------------------------------------


def make_tiny_a(out: Path, tok_dir: Path, tok, arrays: dict, meta: dict, lens: dict) -> None:
    folder = out / "tiny-a"
    if folder.exists():
        shutil.rmtree(folder)
    config = GPT2Config(
        vocab_size=50257,
        n_positions=128,
        n_embd=16,
        n_layer=2,
        n_head=2,
        activation_function="gelu_new",
        scale_attn_by_inverse_layer_idx=True,
        bos_token_id=EOT,
        eos_token_id=EOT,
    )
    torch.manual_seed(SEED_A)
    model = GPT2LMHeadModel(config)
    reinit_(model, torch.Generator().manual_seed(SEED_A))
    model.save_pretrained(folder)
    finish_folder(folder, tok_dir)

    state = load_file(str(folder / "model.safetensors"))
    keys = sorted(state)
    assert all(k.startswith("transformer.") for k in keys), keys
    assert not any(k.endswith((".attn.bias", "masked_bias")) for k in keys), keys
    assert "lm_head.weight" not in keys
    assert all(v.dtype == torch.float32 for v in state.values())
    m32, m64 = reference_models(GPT2Config.from_pretrained(folder), state)
    name = "tiny_a"
    entry: dict = {
        "folder": "tiny-a",
        "layout": "transformers-5 save_pretrained (transformer.* keys, no attn buffers, no lm_head)",
        "param_count": int(m64.num_parameters()),
        "config": {
            k: getattr(config, k)
            for k in (
                "vocab_size",
                "n_positions",
                "n_embd",
                "n_layer",
                "n_head",
                "n_inner",
                "activation_function",
                "layer_norm_epsilon",
                "scale_attn_by_inverse_layer_idx",
                "bos_token_id",
                "eos_token_id",
            )
        },
        "safetensors_keys": keys,
    }

    # logits
    ids = tok.encode(TINY_A_LOGITS_TEXT).ids
    assert len(ids) == 6, ids
    x = torch.tensor([ids])
    l64, l32 = logits_of(m64, x), logits_of(m32, x)
    arrays[f"{name}/input_ids"] = i32([ids])
    arrays[f"{name}/logits"] = f32(l64)
    inside(m64, x, name, lens)
    entry["logits_text"] = TINY_A_LOGITS_TEXT
    entry["logits_f32_vs_f64_max_abs_diff"] = max_abs(l32, l64)
    entry["logits_abs_max"] = float(l64.abs().max())
    entry["logits_std"] = float(l64.std())

    # sensitivity: how much the logits move for common mistakes (helps choosing tolerances)
    sens = {}
    for label, change in (
        ("activation gelu (erf) instead of gelu_new", {"activation_function": "gelu"}),
        ("no scale_attn_by_inverse_layer_idx", {"scale_attn_by_inverse_layer_idx": False}),
        ("layer_norm_epsilon 1e-6 instead of 1e-5", {"layer_norm_epsilon": 1e-6}),
    ):
        cfg = GPT2Config(**{**config.to_dict(), **change})
        _, alt = reference_models(cfg, state)
        sens[label] = max_abs(logits_of(alt, x), l64)
    entry["logits_max_abs_change_if"] = sens

    # greedy generation
    gens = []
    diffs = []
    min_margin = math.inf
    for i, text in enumerate(TINY_A_PROMPTS):
        prompt = tok.encode(text).ids
        seq64, step64 = greedy(m64, prompt)
        seq32, step32 = greedy(m32, prompt)
        top = torch.topk(step64, 5, dim=-1)
        margin = top.values[:, 0] - top.values[:, 1]
        min_margin = min(min_margin, float(margin.min()))
        arrays[f"{name}/gen{i}/prompt_ids"] = i32(prompt)
        arrays[f"{name}/gen{i}/tokens"] = i32(seq64)
        arrays[f"{name}/gen{i}/top5_values"] = f32(top.values)
        arrays[f"{name}/gen{i}/top5_ids"] = i32(top.indices.numpy())
        arrays[f"{name}/gen{i}/margin"] = f32(margin)
        same = bool(np.array_equal(seq32, seq64))
        if same:
            diffs.append(max_abs(step32, step64))
        gens.append(
            {
                "prompt_text": text,
                "prompt_len": len(prompt),
                "tokens_text": tok.decode(seq64.tolist()),
                "f32_tokens_equal_f64": same,
            }
        )
    entry["generate"] = {
        "prompts": gens,
        "max_new_tokens": MAX_NEW_TOKENS,
        "min_top1_top2_margin": min_margin,
        "step_logits_f32_vs_f64_max_abs_diff": max(diffs) if diffs else None,
    }

    # sliding-window perplexity
    eval_ids = tok.encode(EVAL_TEXT).ids
    arrays[f"{name}/eval_ids"] = i32(eval_ids)
    ppl = {"text": EVAL_TEXT, "n_ids": len(eval_ids), "window": PPL_WINDOW, "strides": {}}
    for stride in PPL_STRIDES:
        s64, n64, hf64 = sliding_window_nll(m64, eval_ids, PPL_WINDOW, stride)
        s32, n32, _ = sliding_window_nll(m32, eval_ids, PPL_WINDOW, stride)
        assert n32 == n64
        # HF's ForCausalLMLoss casts logits to float32, so agree to float32 precision only
        assert abs(hf64 - s64) < 1e-6 * max(1.0, abs(s64)), (hf64, s64)
        mean = s64 / n64
        ppl["strides"][str(stride)] = {
            "sum_nll": s64,
            "n_tokens": n64,
            "mean_nll": mean,
            "perplexity": math.exp(mean),
            "sum_nll_f32_vs_f64_abs_diff": abs(s32 - s64),
            "sum_nll_hf_loss_times_count_abs_diff": abs(hf64 - s64),
        }
    entry["perplexity"] = ppl
    meta["models"][name] = entry


# --------------------------------------------------------------------------------------------
# tiny-b: the Hub's old layout, hand-written
# --------------------------------------------------------------------------------------------


def make_tiny_b(out: Path, arrays: dict, meta: dict, lens: dict) -> None:
    folder = out / "tiny-b"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    eos = 511  # GPT-2's 50256 does not exist in a 512-token vocab
    config = GPT2Config(
        vocab_size=512,
        n_positions=64,
        n_embd=32,
        n_layer=3,
        n_head=4,
        n_inner=40,
        activation_function="gelu",
        layer_norm_epsilon=1e-5,
        scale_attn_by_inverse_layer_idx=False,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    torch.manual_seed(SEED_B)
    model = GPT2LMHeadModel(config)
    reinit_(model, torch.Generator().manual_seed(SEED_B))

    tensors: dict[str, np.ndarray] = {}
    for k, v in model.transformer.state_dict().items():
        tensors[k] = v.detach().numpy().astype(np.float32)
    causal = np.tril(np.ones((config.n_positions, config.n_positions), np.float32))
    for i in range(config.n_layer):
        tensors[f"h.{i}.attn.bias"] = causal[None, None].copy()
        tensors[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    assert not any(k.startswith(("transformer.", "lm_head")) for k in tensors)
    safetensors.numpy.save_file(
        tensors, str(folder / "model.safetensors"), metadata={"format": "pt"}
    )
    # an old-style Hub config.json (n_ctx and friends included)
    cfg_json = {
        "activation_function": "gelu",
        "architectures": ["GPT2LMHeadModel"],
        "attn_pdrop": 0.1,
        "bos_token_id": eos,
        "embd_pdrop": 0.1,
        "eos_token_id": eos,
        "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05,
        "model_type": "gpt2",
        "n_ctx": config.n_positions,
        "n_embd": config.n_embd,
        "n_head": config.n_head,
        "n_inner": config.n_inner,
        "n_layer": config.n_layer,
        "n_positions": config.n_positions,
        "resid_pdrop": 0.1,
        "scale_attn_by_inverse_layer_idx": False,
        "summary_activation": None,
        "summary_first_dropout": 0.1,
        "summary_proj_to_labels": True,
        "summary_type": "cls_index",
        "summary_use_proj": True,
        "vocab_size": config.vocab_size,
    }
    (folder / "config.json").write_text(json.dumps(cfg_json, indent=2) + "\n")
    finish_folder(folder, None)

    # load back what was written, through transformers' own loader too
    state = {
        k: torch.from_numpy(v)
        for k, v in safetensors.numpy.load_file(str(folder / "model.safetensors")).items()
    }
    keys = sorted(state)
    loaded_cfg = GPT2Config.from_pretrained(folder)
    m32, m64 = reference_models(loaded_cfg, state)
    hf = GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager").eval()
    hf_state = hf.state_dict()
    for k, v in m32.state_dict().items():
        assert torch.equal(hf_state[k], v), k

    name = "tiny_b"
    entry: dict = {
        "folder": "tiny-b",
        "layout": "old Hub layout (no transformer. prefix, attn.bias + attn.masked_bias buffers, "
        "no lm_head), written with safetensors.numpy.save_file",
        "param_count": int(m64.num_parameters()),
        "config": cfg_json,
        "safetensors_keys": keys,
    }
    g = torch.Generator().manual_seed(42)
    x = torch.randint(0, 512, (2, 16), generator=g)
    l64, l32 = logits_of(m64, x), logits_of(m32, x)
    assert max_abs(logits_of(hf, x), l32) == 0.0
    arrays[f"{name}/input_ids"] = i32(x.numpy())
    arrays[f"{name}/logits"] = f32(l64)
    inside(m64, x, name, lens)
    entry["logits_f32_vs_f64_max_abs_diff"] = max_abs(l32, l64)
    entry["logits_abs_max"] = float(l64.abs().max())
    entry["logits_std"] = float(l64.std())
    sens = {}
    for label, change in (
        ("activation gelu_new instead of gelu", {"activation_function": "gelu_new"}),
        ("layer_norm_epsilon 1e-6 instead of 1e-5", {"layer_norm_epsilon": 1e-6}),
    ):
        cfg = GPT2Config(**{**loaded_cfg.to_dict(), **change})
        _, alt = reference_models(cfg, state)
        sens[label] = max_abs(logits_of(alt, x), l64)
    entry["logits_max_abs_change_if"] = sens

    gens = []
    diffs = []
    min_margin = math.inf
    for i, plen in enumerate((1, 5, 9)):
        prompt = torch.randint(0, 512, (plen,), generator=g).tolist()
        seq64, step64 = greedy(m64, prompt)
        seq32, step32 = greedy(m32, prompt)
        top2 = torch.topk(step64, 2, dim=-1).values
        min_margin = min(min_margin, float((top2[:, 0] - top2[:, 1]).min()))
        arrays[f"{name}/gen{i}/prompt_ids"] = i32(prompt)
        arrays[f"{name}/gen{i}/tokens"] = i32(seq64)
        arrays[f"{name}/gen{i}/step_logits"] = f32(step64)
        same = bool(np.array_equal(seq32, seq64))
        if same:
            diffs.append(max_abs(step32, step64))
        gens.append({"prompt_len": plen, "f32_tokens_equal_f64": same})
    entry["generate"] = {
        "prompts": gens,
        "max_new_tokens": MAX_NEW_TOKENS,
        "min_top1_top2_margin": min_margin,
        "step_logits_f32_vs_f64_max_abs_diff": max(diffs) if diffs else None,
    }
    meta["models"][name] = entry


# --------------------------------------------------------------------------------------------
# 124M benchmark model (not committed)
# --------------------------------------------------------------------------------------------


def make_bench(folder: Path, tok_dir: Path) -> int:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config())
    n = int(model.num_parameters())
    assert n == 124_439_808, n
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    finish_folder(folder, tok_dir)
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("tests/fixtures"))
    ap.add_argument("--tokenizer", type=Path, default=Path("gpt2cli/assets"))
    ap.add_argument("--bench-dir", type=Path, default=None)
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(0)
    tok = load_tokenizer(args.tokenizer)
    args.out.mkdir(parents=True, exist_ok=True)

    arrays: dict[str, np.ndarray] = {}
    meta: dict = {
        "generator": "scripts/make_fixtures.py",
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "safetensors": safetensors.__version__,
            "numpy": np.__version__,
        },
        "notes": [
            "Reference numbers are computed in float64 (eager attention, eval mode) from the "
            "stored float32 weights, then stored as float32 (generate step logits are float32 "
            "casts made by generate itself).",
            "Greedy continuations: generate(do_sample=False, use_cache=True, max_new_tokens=20, "
            "eos_token_id=None) -- never stops early; logits are the raw (unprocessed) logits.",
            "Perplexity (golden.json only): HF perplexity-guide sliding window (window 32) over "
            "tiny_a/eval_ids, summing token NLL in float64; the first token of each window is "
            "never scored.",
        ],
        "models": {},
    }
    lens: dict[str, np.ndarray] = {}
    make_tiny_a(args.out, args.tokenizer, tok, arrays, meta, lens)
    make_tiny_b(args.out, arrays, meta, lens)
    np.savez(args.out / "lens.npz", **lens)

    npz_path = args.out / "golden.npz"
    np.savez(npz_path, **arrays)
    with np.load(npz_path, allow_pickle=False) as z:
        assert sorted(z.files) == sorted(arrays)
    meta["arrays"] = {
        k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in sorted(arrays.items())
    }
    (args.out / "golden.json").write_text(json.dumps(meta, indent=2) + "\n")

    for name, entry in meta["models"].items():
        print(name, "params", entry["param_count"])
        print("  logits f32 vs f64", entry["logits_f32_vs_f64_max_abs_diff"])
        print("  generate", {k: v for k, v in entry["generate"].items() if k != "prompts"})
        if "perplexity" in entry:
            print("  ppl", json.dumps(entry["perplexity"]["strides"]))
        print("  sensitivity", entry["logits_max_abs_change_if"])

    if args.bench_dir is not None:
        n = make_bench(args.bench_dir, args.tokenizer)
        print("bench model", args.bench_dir, "params", n)


if __name__ == "__main__":
    main()
