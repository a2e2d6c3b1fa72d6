"""`rora-hf`: lm-eval-harness's HF backend with rora's log-likelihood engine (loglik.py) behind it.

Why a subclass of lm-eval's HFLM that replaces only `_loglikelihood_tokens`: everything that defines lm-eval's
numbers stays lm-eval's own code, unchanged - the task YAMLs, prompts and target delimiters, the tokenization
split (TemplateLM._encode_pair, HFLM.tok_encode with its BOS rules, the empty-context prefix token), the metrics,
standard errors and sample logs - and only the arithmetic that turns token ids into log-likelihoods is replaced by
one that gives the same numbers faster: each example's context runs once for all of its choices (HFLM runs one row
per choice), rows are length-sorted and batched by a token budget, and the LM head runs only where a log-prob is
read. HFLM's left truncation to the window is reproduced exactly (loglik.left_truncate).

Importing this module registers the backend, so `simple_evaluate(model="rora-hf", ...)` works; from a shell:

    python -m rora.evaluation.lmeval_backend run --model rora-hf --model_args pretrained=DIR --tasks ...

(`lm_eval --model rora-hf` needs rora imported first, which that command does; lm-eval has no plugin entry point.)
Extra model arguments: `batch_tokens` (padded tokens per forward pass; default 1024 on CPU, 32768 on GPU) and
`precision` (auto, float32 or bfloat16: numerics.matmul_precision).
"""
from __future__ import annotations

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from .loglik import default_tokens, left_truncate, pack, score_rows


class RoraLM(HFLM):
    """HFLM whose multiple-choice log-likelihoods come from rora's engine; all other behaviour is HFLM's."""

    def __init__(self, pretrained, batch_tokens: int | None = None, precision: str = "auto", **kwargs):
        if isinstance(pretrained, str) and kwargs.get("dtype", "auto") == "auto" and \
                str(kwargs.get("device", "cuda")).startswith("cpu"):
            kwargs["dtype"] = "float32"  # a bf16 checkpoint runs several times slower on a CPU than in fp32
        super().__init__(pretrained=pretrained, **kwargs)
        self.batch_tokens = int(batch_tokens) if batch_tokens else default_tokens(self.device)
        self.precision = precision
        self._keys = None

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        # Remember which example each request belongs to: lm-eval flattens an example's choices into separate
        # requests, and the engine wants them back together (one packed row per example). TemplateLM.loglikelihood
        # tokenizes and calls _loglikelihood_tokens with the requests in this same order.
        self._keys = [(r.task_name, r.doc_id) for r in requests]
        try:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        finally:
            self._keys = None

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        # Without example ids (loglikelihood_rolling, direct calls) requests with the same context share a row.
        keys = self._keys if self._keys is not None and len(self._keys) == len(requests) else \
            [tuple(ctx) for _, ctx, _ in requests]
        members: dict = {}
        for i, key in enumerate(keys):
            members.setdefault(key, []).append(i)
        groups = list(members.values())
        rows = []
        for group in groups:
            pairs = []
            for i in group:
                _, ctx, cont = requests[i]
                assert 0 < len(cont) <= self.max_length, "continuation longer than the window (HFLM asserts this too)"
                pairs.append((left_truncate(ctx, cont, self.max_length), cont))
            rows.append(pack(pairs))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        found = score_rows(self.model, rows, pad_id=pad, max_tokens=self.batch_tokens, precision=self.precision,
                           progress=not disable_tqdm and self.rank == 0, desc="rora-hf loglikelihood")
        out = [None] * len(requests)
        for group, answers in zip(groups, found):
            for i, answer in zip(group, answers):
                out[i] = answer
                request_str = requests[i][0]
                if request_str is not None:  # as HFLM: rolling windows are cached per document by their caller
                    self.cache_hook.add_partial("loglikelihood", request_str, answer)
        return out


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    import rora.evaluation.lmeval_backend  # noqa: F401  registers the importable class, not this __main__ copy

    cli_evaluate()
else:
    register_model("rora-hf")(RoraLM)
