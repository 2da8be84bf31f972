#!/usr/bin/env python3
"""Write a tiny random-weight Llama GGUF model for llama-server e2e tests.

Output: ``${BATCHGATE_CACHE:-~/.cache/batchgate}/tiny-llama.gguf`` (or ``--out``),
plus a sidecar ``<out>.sha256`` (``<sha256>  <recipe>``) used to skip the work when
the file is already there and intact. Prints the model path (last stdout line).

Model: llama architecture, n_embd 64, 2 layers, 4 heads (head dim 16), ffn 128,
F32 weights from ``numpy.random.default_rng(SEED)`` -> byte-identical every run.

Tokenizer: SentencePiece-style ("llama") vocab built here: <unk>/<s>/</s>,
byte-fallback tokens <0x00>..<0xFF> (so any text tokenizes), <|im_start|> and
<|im_end|> control tokens, and ~380 ASCII pieces ("a", "\u2581a", "\u2581the", ...).
A ChatML jinja template is embedded (tokenizer.chat_template) so
/v1/chat/completions works.

Generation never stops early: residual-stream dimension 0 is a constant +8 for
every token (embedding column 0 = 8; attn_output/ffn_down never write to it), so
after the final RMSNorm that dimension is always ~+5.7. The output-projection rows
of every non-"normal" token (<unk>, <s>, </s>, <|im_start|>, <|im_end|>, the 256
byte tokens) carry -100 in that column and zeros elsewhere: their logits are about
-570 while normal tokens' logits are ~N(0, 3). So EOS/EOG is never sampled (any
sampler settings), ``max_tokens`` tokens are always produced, and the output is
always printable ASCII (no partial UTF-8 sequences held back by the server).

Needs ``gguf==0.19.0`` (PyPI; same version as the gguf-py vendored in
llama-cpp-python 0.3.36) and numpy. If the running interpreter lacks them, the
script creates ``<cache>/buildenv`` (a throwaway venv), installs the pins there
and re-executes itself with it, so it can be started with any python3.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

GGUF_VERSION = "0.19.0"
NUMPY_VERSION = "2.4.6"
SEED = 20240917
# Bump whenever the model/tokenizer recipe below changes: invalidates caches.
RECIPE = "batchgate-tiny-llama-v1"

N_EMBD = 64
N_LAYER = 2
N_HEAD = 4
N_HEAD_KV = 4
N_FF = 128
N_CTX_TRAIN = 4096
RMS_EPS = 1e-5
ROPE_BASE = 10000.0
CONST_DIM_VALUE = 8.0  # residual dim 0, see module docstring
BANNED_LOGIT_WEIGHT = -100.0
OUT_STD = 0.5

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_WORDS_TEXT = (
    "the of and to in is it you that he was for on are as with his they at be this "
    "have from or one had by word but not what all were we when your can said there "
    "use an each which she do how their if will up other about out many then them "
    "these so some her would make like him into time has look two more write go see "
    "number no way could people my than first water been call who oil its now find "
    "hello world batch gate token model server stream request reply proxy"
)
WORDS = _WORDS_TEXT.split()

SP = "\u2581"  # SentencePiece word-boundary marker


def cache_dir() -> Path:
    env = os.environ.get("BATCHGATE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "batchgate"


def default_out() -> Path:
    return cache_dir() / "tiny-llama.gguf"


# --------------------------------------------------------------------------- #
# cache validity (stdlib only, so the fast path needs no gguf/numpy)
# --------------------------------------------------------------------------- #


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _stamp_path(out: Path) -> Path:
    return out.with_name(out.name + ".sha256")


def is_valid(out: Path) -> bool:
    stamp = _stamp_path(out)
    if not (out.is_file() and stamp.is_file()):
        return False
    try:
        digest, recipe = stamp.read_text().split()
    except ValueError:
        return False
    if recipe != RECIPE:
        return False
    with out.open("rb") as f:
        if f.read(4) != b"GGUF":
            return False
    return _sha256(out) == digest


# --------------------------------------------------------------------------- #
# bootstrap: make sure gguf==GGUF_VERSION and numpy are importable
# --------------------------------------------------------------------------- #


def _have_deps() -> bool:
    try:
        from importlib.metadata import version

        importlib.import_module("numpy")
        return version("gguf") == GGUF_VERSION
    except Exception:
        return False


def _reexec_in_buildenv() -> None:
    if os.environ.get("_BATCHGATE_TINY_MODEL_REEXEC"):
        raise SystemExit(f"gguf=={GGUF_VERSION} + numpy still not importable in {sys.executable}")
    venv = cache_dir() / "buildenv"
    py = venv / "bin" / "python"
    if not py.exists():
        print(f"[make_tiny_model] creating {venv}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    check = [
        str(py),
        "-c",
        f"import numpy, importlib.metadata as m; assert m.version('gguf') == '{GGUF_VERSION}'",
    ]
    if subprocess.run(check, capture_output=True).returncode != 0:
        print(
            f"[make_tiny_model] pip install gguf=={GGUF_VERSION} numpy=={NUMPY_VERSION}",
            file=sys.stderr,
        )
        subprocess.run(
            [
                str(py),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                f"gguf=={GGUF_VERSION}",
                f"numpy=={NUMPY_VERSION}",
            ],
            check=True,
        )
    env = dict(os.environ, _BATCHGATE_TINY_MODEL_REEXEC="1")
    os.execve(str(py), [str(py), os.path.abspath(__file__), *sys.argv[1:]], env)


# --------------------------------------------------------------------------- #
# vocabulary and weights
# --------------------------------------------------------------------------- #


def build_vocab() -> tuple[list[str], list[float], list[int], list[bool]]:
    """Return (tokens, scores, token types, allowed-as-output mask)."""
    gguf = importlib.import_module("gguf")
    tt = gguf.TokenType
    tokens: list[str] = []
    scores: list[float] = []
    types: list[int] = []

    def add(tok: str, score: float, typ: int) -> None:
        tokens.append(tok)
        scores.append(score)
        types.append(int(typ))

    add("<unk>", 0.0, tt.UNKNOWN)  # 0
    add("<s>", 0.0, tt.CONTROL)  # 1 = BOS
    add("</s>", 0.0, tt.CONTROL)  # 2 = EOS
    for b in range(256):  # 3..258 byte fallback
        add(f"<0x{b:02X}>", 0.0, tt.BYTE)
    add("<|im_start|>", 0.0, tt.CONTROL)  # 259
    add("<|im_end|>", 0.0, tt.CONTROL)  # 260

    pieces: list[str] = [SP]
    printable = [chr(c) for c in range(0x21, 0x7F)]
    pieces += printable
    pieces += [SP + c for c in printable]
    for w in WORDS:  # every prefix, so SPM bigram merging can reach the word
        pieces += [SP + w[:k] for k in range(2, len(w) + 1)]
        pieces += [w[:k] for k in range(2, len(w) + 1)]
    seen: set[str] = set()
    rank = 0
    for p in pieces:
        if p in seen:
            continue
        seen.add(p)
        # SPM merges toward higher scores; prefer longer pieces, then earlier ones.
        add(p, float(len(p)) * 10.0 - rank * 1e-3, tt.NORMAL)
        rank += 1

    allowed = [t == int(tt.NORMAL) for t in types]
    return tokens, scores, types, allowed


def build_tensors(n_vocab: int, allowed: list[bool]) -> dict[str, Any]:
    np = importlib.import_module("numpy")
    rng = np.random.default_rng(SEED)
    f32 = np.float32

    def normal(shape: tuple[int, ...], std: float) -> Any:
        return (rng.standard_normal(shape) * std).astype(f32)

    t: dict[str, Any] = {}
    emb = normal((n_vocab, N_EMBD), 1.0)
    emb[:, 0] = CONST_DIM_VALUE
    t["token_embd.weight"] = emb

    head_dim = N_EMBD // N_HEAD
    n_kv = head_dim * N_HEAD_KV
    s_in = 1.0 / np.sqrt(N_EMBD)
    for i in range(N_LAYER):
        p = f"blk.{i}."
        t[p + "attn_norm.weight"] = np.ones(N_EMBD, dtype=f32)
        t[p + "attn_q.weight"] = normal((N_EMBD, N_EMBD), s_in)
        t[p + "attn_k.weight"] = normal((n_kv, N_EMBD), s_in)
        t[p + "attn_v.weight"] = normal((n_kv, N_EMBD), s_in)
        wo = normal((N_EMBD, N_EMBD), s_in)
        wo[0, :] = 0.0  # never write residual dim 0
        t[p + "attn_output.weight"] = wo
        t[p + "ffn_norm.weight"] = np.ones(N_EMBD, dtype=f32)
        t[p + "ffn_gate.weight"] = normal((N_FF, N_EMBD), s_in)
        t[p + "ffn_up.weight"] = normal((N_FF, N_EMBD), s_in)
        wd = normal((N_EMBD, N_FF), 1.0 / np.sqrt(N_FF))
        wd[0, :] = 0.0
        t[p + "ffn_down.weight"] = wd

    t["output_norm.weight"] = np.ones(N_EMBD, dtype=f32)
    out = normal((n_vocab, N_EMBD), OUT_STD)
    mask = np.asarray(allowed, dtype=bool)
    out[:, 0] = 0.0
    out[~mask, :] = 0.0
    out[~mask, 0] = BANNED_LOGIT_WEIGHT
    t["output.weight"] = out
    return t


def write_model(out: Path) -> None:
    gguf = importlib.import_module("gguf")
    tokens, scores, types, allowed = build_vocab()
    tensors = build_tensors(len(tokens), allowed)

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        w = gguf.GGUFWriter(str(tmp), "llama")
        w.add_name("batchgate tiny random llama")
        w.add_string("batchgate.tiny_model.recipe", RECIPE)
        w.add_uint32("batchgate.tiny_model.seed", SEED)
        w.add_context_length(N_CTX_TRAIN)
        w.add_embedding_length(N_EMBD)
        w.add_block_count(N_LAYER)
        w.add_feed_forward_length(N_FF)
        w.add_head_count(N_HEAD)
        w.add_head_count_kv(N_HEAD_KV)
        w.add_rope_dimension_count(N_EMBD // N_HEAD)
        w.add_rope_freq_base(ROPE_BASE)
        w.add_layer_norm_rms_eps(RMS_EPS)
        w.add_vocab_size(len(tokens))
        w.add_file_type(int(gguf.LlamaFileType.ALL_F32))

        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
        w.add_add_space_prefix(True)
        w.add_chat_template(CHATML_TEMPLATE)

        for name, arr in tensors.items():
            w.add_tensor(name, arr)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

        tmp.chmod(0o644)
        digest = _sha256(tmp)
        stamp_tmp = _stamp_path(tmp)
        stamp_tmp.write_text(f"{digest}  {RECIPE}\n")
        os.replace(tmp, out)
        os.replace(stamp_tmp, _stamp_path(out))
    finally:
        tmp.unlink(missing_ok=True)
        _stamp_path(tmp).unlink(missing_ok=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="default: <cache>/tiny-llama.gguf")
    ap.add_argument("--force", action="store_true", help="rewrite even if valid")
    args = ap.parse_args()
    out: Path = (args.out or default_out()).expanduser().absolute()

    if not args.force and is_valid(out):
        print(out)
        return 0
    if not _have_deps():
        _reexec_in_buildenv()  # does not return
    write_model(out)
    print(f"[make_tiny_model] wrote {out} ({out.stat().st_size} bytes)", file=sys.stderr)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
