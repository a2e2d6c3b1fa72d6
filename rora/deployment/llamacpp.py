"""llama.cpp, the edge runtime, through llama-cpp-python (optional: `pip install 'rora[edge]'` or `make edge`).

Used by export to run a written GGUF in llama.cpp itself (logits, greedy tokens, perplexity), to quantize with
llama.cpp's own quantizer (the K-quants), and by benchmarks/bench_edge.py for tokens/s. Nothing here is
imported unless llama_cpp is installed; `available()` says whether it is.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path

import numpy as np

from ..errors import ExportError

INSTALL_HINT = ("pip install 'rora[edge]' (or `make edge`; it builds llama-cpp-python from source, ~15 min on "
                "2 cores)")
# GGUF file type name -> llama_ftype (llama.h)
FTYPES = {"F32": 0, "F16": 1, "Q8_0": 7, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18}
GGML_TYPE_F32 = 0


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def version() -> str:
    import llama_cpp

    return f"llama-cpp-python {llama_cpp.__version__}"


def _threads() -> int:
    """RORA_LLAMACPP_THREADS, else up to 4 cores. On cores other jobs share, 1 is fastest: llama.cpp's threads
    spin at every barrier, and one descheduled thread stalls the rest (2.9 vs 22.5 tokens/s measured)."""
    if os.environ.get("RORA_LLAMACPP_THREADS"):
        return max(1, int(os.environ["RORA_LLAMACPP_THREADS"]))
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


class Runner:
    """One GGUF file loaded in llama.cpp, KV cache in f32 so that a comparison measures the weights, not the
    cache's f16 rounding. `logits_all` keeps every position's logits (comparisons, perplexity)."""

    def __init__(self, path: str | Path, n_ctx: int = 512, logits_all: bool = True, threads: int | None = None):
        import llama_cpp

        try:
            with _quiet():  # verbose=False still lets some context-creation lines through from C
                self.llm = llama_cpp.Llama(
                    model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=logits_all,
                    n_threads=threads or _threads(), n_threads_batch=threads or _threads(),
                    type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, verbose=False,
                )
        except (ValueError, RuntimeError) as exc:  # llama-cpp-python's "Failed to load model from file"
            raise ExportError(f"llama.cpp cannot load {Path(path).name}: {exc}") from None

    def close(self) -> None:
        self.llm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def logits(self, ids) -> np.ndarray:
        """(len(ids), vocab) logits of one sequence, from an empty cache."""
        self.llm.reset()
        self.llm.eval([int(i) for i in ids])
        return np.array(self.llm.scores[: len(ids)], dtype=np.float64)

    def greedy(self, prompt, n: int) -> list[int]:
        """`n` greedy tokens after `prompt` (argmax of the logits; no sampler, so nothing else can differ)."""
        self.llm.reset()
        self.llm.eval([int(i) for i in prompt])
        out = []
        for _ in range(n):
            out.append(int(np.argmax(self.llm.scores[self.llm.n_tokens - 1])))
            self.llm.eval([out[-1]])
        return out

    def tokenize(self, text: str, add_bos: bool = False) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=add_bos, special=False)

    def detokenize(self, ids) -> str:
        """llama.cpp's own llama_detokenize, as llama-cli and llama-server use it (with the pre-tokenizer's space
        clean-up); llama-cpp-python's `Llama.detokenize` joins token pieces and skips that step."""
        import ctypes

        import llama_cpp

        tokens = (llama_cpp.llama_token * len(ids))(*[int(i) for i in ids])
        size = 16 * len(ids) + 16
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_detokenize(self.llm._model.vocab, tokens, len(ids), buf, size, False, False)
        if n < 0:
            raise ExportError(f"llama.cpp could not detokenize {len(ids)} tokens")
        return buf.raw[:n].decode("utf-8", errors="replace")


def nll(logits: np.ndarray, ids) -> float:
    """Mean negative log-likelihood of ids[1:] under logits[:-1] (natural log)."""
    logits = logits[:-1].astype(np.float64)
    top = logits.max(axis=1, keepdims=True)
    logz = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
    target = np.asarray(ids[1:])
    return float((logz - logits[np.arange(len(target)), target]).mean())


def perplexity(path: str | Path, chunks: list[list[int]]) -> float:
    """Perplexity of a GGUF file in llama.cpp over token chunks (each evaluated from an empty cache)."""
    with Runner(path, n_ctx=max(map(len, chunks))) as r:
        return float(np.exp(np.mean([nll(r.logits(c), c) for c in chunks])))


def quantize(src: str | Path, dst: str | Path, qtype: str) -> None:
    """llama.cpp's own quantizer (llama_model_quantize), from an f32/f16 GGUF; tensors whose rows do not fit the
    type's block size get llama.cpp's own fallback type, exactly as `llama-quantize` does."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[qtype]
    params.nthread = _threads()
    with _quiet():
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise ExportError(f"llama.cpp failed to quantize to {qtype} (llama_model_quantize returned {rc})")


@contextlib.contextmanager
def _quiet():
    """llama.cpp logs from C straight to stderr (llama_model_quantize: every tensor); rora's own lines stay the
    only output."""
    from llama_cpp._utils import suppress_stdout_stderr

    with suppress_stdout_stderr(disable=False):
        yield
