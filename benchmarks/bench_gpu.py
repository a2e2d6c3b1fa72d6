"""Benchmark: rora on one GPU (issue 22, parts 1 and 2) with random weights of real shapes; tiny shapes on CPU.

Part 1, speed at the Sheared-LLaMA-1.3B shape (hidden 2048, 24 layers, 16 heads, intermediate 5504, vocab 32000):
packed sequences of 1024 random words of a word-level tokenizer built in memory, read through rora's `text` path.
Each side runs in its own process (clean peak memory) with the same adapter (rora's peft_config: rora, rank 16,
default target modules), batch = micro-batch, AdamW, lr, steps and seed; bf16 students and autocast on GPU:
  rora-sft       rora.recover(objective="sft") as a user calls it (no output directory: nothing timed writes);
  hf-trainer     transformers.Trainer + PEFT on the same packed sequences (bf16=True), labels = input_ids;
  rora-kd        rora.recover(objective="kd"), the teacher a second random model (teacher_dtype auto);
  naive-kd       bench_distill.py's naive loop on the device: both models' full logits in fp32, log-softmax, KL;
  rora-sft-fp32  rora-sft with the fp32 student `rora recover` loads (GPU only; outside the goals).
tokens/s counts the steps after the warm-up (an optimizer-step hook synchronises the device). Model FLOPs per
token, N = every matmul's parameters (LM head included): forward 2N + backward to the inputs 2N (frozen base),
attention 4 * layers * seq * hidden per pass (backward: two; no causal discount, as PaLM's MFU), kd plus the
teacher's forward 2N + attention; MFU against --peak-tflops and against a measured bf16 matmul.

Part 2, the LLaMA-7B shape (hidden 4096, 32 layers, 32 heads, intermediate 11008) in bf16: build + teacher copy,
Taylor prune 20%, reconstruction, 20 kd steps with the unpruned teacher (rora's defaults; again with gradient
checkpointing; again with the fp32 student the CLI loads), merge, the log-likelihood engine: seconds and peak
memory of each stage; a failure is an entry of the table, not the end of the run.

    PYTHONUNBUFFERED=1 python3 benchmarks/bench_gpu.py --out $OUT                # the GPU run, both parts
    python benchmarks/bench_gpu.py --tiny --out /tmp/gpu                          # tiny shapes on CPU (the test's)
    python3 benchmarks/bench_gpu.py --parts speed --profile rora-kd --out $OUT    # + top-20 ops of one side
Each side and stage is skipped (and recorded so) when it would not end within --budget-s of the start.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from _common import RESULTS, environment  # noqa: E402

SHEARED_13B = dict(hidden=2048, layers=24, heads=16, kv_heads=16, intermediate=5504, vocab=32000)
LLAMA_7B = dict(hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008, vocab=32000)
TINY = dict(hidden=64, layers=2, heads=4, kv_heads=4, intermediate=128, vocab=512)
SPEED = {"full": dict(shape=SHEARED_13B, seq=1024, batch=16, warmup=3, steps=10),
         "tiny": dict(shape=TINY, seq=64, batch=4, warmup=1, steps=3)}
SEVEN_B = {"full": dict(shape=LLAMA_7B, prune_samples=8, calib_len=128, recon_samples=32, recon_holdout=8,
                        kd_steps=20, kd_len=256, kd_batch=16, loglik_examples=64, context=(128, 512)),
           "tiny": dict(shape=TINY, prune_samples=4, calib_len=32, recon_samples=8, recon_holdout=2,
                        kd_steps=2, kd_len=32, kd_batch=4, loglik_examples=8, context=(8, 24))}
SIDES = ("rora-sft", "hf-trainer", "rora-kd", "naive-kd", "rora-sft-fp32")
# GPU seconds a part 2 stage (in this order) or a part 1 side is not started without
STAGE_RESERVE_S = {"build": 30, "prune": 30, "reconstruct": 60, "kd": 60, "kd-checkpointing": 60,
                   "kd-fp32-student": 60, "merge": 45, "loglik": 20}
SIDE_RESERVE_S = 45
RANK, LR, SEED, RATIO = 16, 2e-4, 42, 0.2
CARDS_GIB = {"40 GB": 39.5, "80 GB": 79.0}  # what such a card leaves to tensors, about
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
TRAIN_DTYPE = torch.bfloat16 if CUDA else torch.float32
MEMORY_KIND = "torch.cuda.max_memory_allocated" if CUDA else "peak RSS of the process (CPU; not reset per stage)"
T0 = float(os.environ.setdefault("BENCH_GPU_T0", str(time.time())))  # the parent's start, in every child


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.time() - T0:5.0f}s] {msg}", flush=True)


# ---- models, tokenizer, text ---------------------------------------------------------------------------------------
def make_tokenizer(vocab_size: int):
    """A word-level tokenizer over "w0".."w{V-3}" plus <unk> and </s> (EOS and pad): len() == vocab_size."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, **{f"w{i}": i + 2 for i in range(vocab_size - 2)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>", pad_token="</s>")


def random_words(n: int, vocab_size: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(f"w{rng.randrange(vocab_size - 2)}" for _ in range(n))


def write_text(path: Path, tokens: int, vocab_size: int) -> Path:
    """A .txt file (one document) of `tokens` - 1 random words: with its EOS, exactly `tokens` tokens."""
    path.write_text(random_words(tokens - 1, vocab_size, SEED))
    return path


def build_model(shape: dict, positions: int, dtype: torch.dtype, seed: int):
    """A random Llama of `shape`, built directly on the device in `dtype` (weights do not change speed)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                         num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                         intermediate_size=shape["intermediate"], max_position_embeddings=max(2048, positions),
                         bos_token_id=None, eos_token_id=1, pad_token_id=1, tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device(DEVICE):
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def dtype_name(model) -> str:
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def matmul_parameters(shape: dict) -> int:
    """N: the weights every token multiplies (attention, MLP, LM head; not the embedding lookup)."""
    h, kv = shape["hidden"], shape["hidden"] * shape["kv_heads"] // shape["heads"]
    return shape["layers"] * (2 * h * h + 2 * h * kv + 3 * h * shape["intermediate"]) + h * shape["vocab"]


def flops_per_token(shape: dict, seq: int, kd: bool) -> float:
    """Model FLOPs of one training token with a frozen base (see the module docstring)."""
    n, attention = matmul_parameters(shape), 4 * shape["layers"] * seq * shape["hidden"]
    student = (2 * n + attention) + (2 * n + 2 * attention)
    return student + (2 * n + attention if kd else 0)


def matmul_peak_tflops() -> float:
    """Best TFLOP/s of a large torch.mm on the device: bf16 8192^3 on GPU, fp32 512^3 on CPU."""
    n, dtype = (8192, torch.bfloat16) if CUDA else (512, torch.float32)
    a, b = (torch.randn(n, n, device=DEVICE, dtype=dtype) for _ in range(2))
    seconds = []
    for _ in range(6):  # the first round warms up
        sync()
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        sync()
        seconds.append((time.perf_counter() - t0) / 10)
    return 2 * n**3 / min(seconds[1:]) / 1e12


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def reset_peak() -> None:
    if CUDA:
        gc.collect()  # what the last stage left in reference cycles (its trainer, optimizer, accelerator)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    """MEMORY_KIND, in GiB."""
    if CUDA:
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


@contextlib.contextmanager
def step_clock(profiler=None):
    """The end times of every optimizer step of any torch optimizer (rora's, the Trainer's, the naive loop's), the
    device synchronised first; with a profiler, each step also advances its schedule."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    times = []

    def tick(optimizer, args, kwargs) -> None:
        sync()
        times.append(time.perf_counter())
        if profiler is not None:
            profiler.step()

    handle = register_optimizer_step_post_hook(tick)
    try:
        yield times
    finally:
        handle.remove()


# ---- part 1: one side, in its own process --------------------------------------------------------------------------
def speed_config(s: dict, objective: str, text: Path, **kw):
    from rora.config import RecoverConfig

    n_seq = (s["warmup"] + s["steps"]) * s["batch"]
    return RecoverConfig(objective=objective, method="rora", rank=RANK, lr=LR, warmup_steps=0, seed=SEED,
                         cutoff_len=s["seq"], batch_size=s["batch"], micro_batch_size=s["batch"],
                         max_steps=s["warmup"] + s["steps"], val_set_size=0, text=str(text),
                         max_text_tokens=n_seq * s["seq"], **kw)


def run_side(side: str, mode: str, work: Path, profile_dir: Path | None) -> dict:
    from rora.measure import heldout_metrics
    from rora.recovery.data import prepare_text, text_source
    from rora.recovery.trainer import recover

    s = SPEED[mode]
    shape, kd = s["shape"], side.endswith("kd")
    tok = make_tokenizer(shape["vocab"])
    cfg = speed_config(s, "kd" if kd else "sft", work / f"{side}.txt")
    write_text(work / f"{side}.txt", cfg.max_text_tokens, shape["vocab"])
    sequences = prepare_text(text_source(cfg), tok, cfg).train  # rora's packing, for the sides outside rora
    reset_peak()
    dtype = torch.float32 if side == "rora-sft-fp32" else TRAIN_DTYPE
    student = build_model(shape, s["seq"], dtype, seed=0)
    teacher = build_model(shape, s["seq"], TRAIN_DTYPE, seed=1) if kd else None
    say(f"{side}: models built, training {s['warmup']} + {s['steps']} steps of {s['batch']} x {s['seq']} tokens")
    profiler = start_profiler(s, profile_dir / f"profile_{side}.txt") if profile_dir is not None else None
    with step_clock(profiler) as times:
        if side.startswith("rora"):
            model = recover(student, tok, None, cfg, None, progress=False, teacher=teacher).model
        elif side == "hf-trainer":
            model = hf_trainer(student, sequences, cfg, work)
        else:
            model = naive_kd(student, teacher, sequences, cfg)
    if profiler is not None:
        profiler.stop()
    timed = s["batch"] * s["seq"] * (len(times) - s["warmup"])  # tokens after the warm-up steps
    row = {"side": side, "tokens_per_second": timed / (times[-1] - times[s["warmup"] - 1]), "peak_gib": peak_gib(),
           "student_dtype": dtype_name(student), "teacher_dtype": dtype_name(teacher) if kd else None,
           "steps": len(times), "attention": student.config._attn_implementation,
           **({"profile": str(profile_dir / f"profile_{side}.txt")} if profiler is not None else {})}
    held = heldout_metrics(model, teacher, tok, sequences[:2], cutoff_len=s["seq"], batch_size=2)
    return {**row, "heldout_loss": held["loss"], "heldout_kl": held["kl"]}


def hf_trainer(model, sequences, cfg, work: Path):
    """transformers.Trainer + PEFT at the run's settings: labels = input_ids (the model shifts them)."""
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments, default_data_collator

    from rora.recovery.methods import peft_config

    torch.manual_seed(SEED)
    peft_model = get_peft_model(model, peft_config(cfg, model))
    data = [{"input_ids": torch.tensor(e.input_ids), "labels": torch.tensor(e.input_ids)} for e in sequences]
    args = TrainingArguments(output_dir=str(work / "hf-trainer"), per_device_train_batch_size=cfg.micro_batch_size,
                             gradient_accumulation_steps=cfg.batch_size // cfg.micro_batch_size,
                             max_steps=cfg.max_steps, learning_rate=cfg.lr, lr_scheduler_type="linear", warmup_steps=0,
                             weight_decay=0.0, optim="adamw_torch", bf16=CUDA, use_cpu=not CUDA, seed=SEED,
                             save_strategy="no", logging_steps=10**6, report_to=[], disable_tqdm=True,
                             remove_unused_columns=False, dataloader_num_workers=0)
    Trainer(model=peft_model, args=args, train_dataset=data, data_collator=default_data_collator).train()
    return peft_model


def naive_kd(model, teacher, sequences, cfg):
    """The KD loop as usually written (bench_distill.py's naive side, on the device): full logits of both models."""
    import torch.nn.functional as F
    from peft import get_peft_model
    from transformers import get_linear_schedule_with_warmup

    from rora.recovery.methods import peft_config

    torch.manual_seed(SEED)
    peft_model = get_peft_model(model, peft_config(cfg, model)).train()
    teacher.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, cfg.max_steps)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=CUDA)
    for step in range(cfg.max_steps):
        batch = sequences[step * cfg.batch_size : (step + 1) * cfg.batch_size]
        ids = torch.tensor([e.input_ids for e in batch], device=DEVICE)
        with autocast:
            student_logits = peft_model(input_ids=ids).logits[:, :-1].float()
            with torch.no_grad():
                teacher_logits = teacher(input_ids=ids).logits[:, :-1].float()
        kl = F.kl_div(student_logits.log_softmax(-1), teacher_logits.log_softmax(-1), log_target=True,
                      reduction="none").sum(-1)
        kl.mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return peft_model


def start_profiler(s: dict, path: Path):
    """torch.profiler over three steps after the warm-up (step_clock advances it at every optimizer step); their top
    20 ops by own time on the device (on CPU: the host) are written to `path`."""
    from torch.profiler import ProfilerActivity, profile, schedule

    key = "self_device_time_total" if CUDA else "self_cpu_time_total"
    profiler = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else []),
                       schedule=schedule(wait=s["warmup"] - 1, warmup=1, active=3, repeat=1),
                       on_trace_ready=lambda p: path.write_text(p.key_averages().table(sort_by=key, row_limit=20)))
    profiler.start()
    return profiler


# ---- part 2: the 7B shape, stage by stage, in one process -----------------------------------------------------------
def stage_build(state: dict, s: dict) -> dict:
    from rora.artifacts import count_parameters

    state["tok"] = make_tokenizer(s["shape"]["vocab"])
    state["model"] = build_model(s["shape"], s["kd_len"], TRAIN_DTYPE, seed=0)
    state["teacher"] = copy.deepcopy(state["model"])
    return {"parameters": count_parameters(state["model"]), "dtype": dtype_name(state["model"])}


def stage_prune(state: dict, s: dict) -> dict:
    from rora.config import PruneConfig
    from rora.pruning.prune import prune

    cfg = PruneConfig(ratio=RATIO, importance="taylor", num_samples=s["prune_samples"], holdout_samples=2,
                      seq_len=s["calib_len"])
    texts = [random_words(s["calib_len"], s["shape"]["vocab"], SEED + i) for i in range(s["prune_samples"] + 2)]
    report = prune(state["model"], state["tok"], cfg, calibration=texts)
    return {"params_before": report.params_before, "params_after": report.params_after,
            "loss_before": report.loss_before, "loss_after": report.loss_after, "settings": cfg.to_dict()}


def stage_reconstruct(state: dict, s: dict) -> dict:
    from rora.config import ReconstructConfig
    from rora.reconstruction.reconstruct import reconstruct

    cfg = ReconstructConfig(num_samples=s["recon_samples"], holdout_samples=s["recon_holdout"], seq_len=s["calib_len"])
    ids = torch.randint(2, s["shape"]["vocab"], (s["recon_samples"] + s["recon_holdout"], s["calib_len"]),
                        generator=torch.Generator().manual_seed(SEED))
    report = reconstruct(state["model"], state["teacher"], state["tok"], cfg, sequences=ids,
                         source="random token ids", progress=False)
    return {"error_removed": report.error_removed, "kl_before": report.heldout_before["kl"],
            "kl_after": report.heldout_after["kl"], "settings": cfg.to_dict()}


def stage_kd(state: dict, s: dict, checkpointing: bool = False, dtype: torch.dtype = TRAIN_DTYPE) -> dict:
    """20 kd steps at rora's defaults (batch = micro-batch 16, cutoff 256, chunked KL 256), the teacher unpruned, the
    student in `dtype`. A run first removes the previous run's adapters, so all start from the same pruned model;
    the merge takes the last run's."""
    from rora.numerics import cast_parameters
    from rora.recovery.trainer import recover

    shape = s["shape"]
    text = write_text(Path(state["work"]) / "kd.txt", s["kd_steps"] * s["kd_batch"] * s["kd_len"], shape["vocab"])
    cfg = speed_config(dict(warmup=0, steps=s["kd_steps"], batch=s["kd_batch"], seq=s["kd_len"]), "kd", text,
                       gradient_checkpointing=checkpointing)
    state.pop("peft", None)
    strip_adapters(state["model"])  # the previous run's adapters, whether it finished or failed
    cast_parameters(state["model"], dtype)  # weights only, as load_model's dtype does (RoPE stays fp32)
    if not checkpointing:
        state["model"].gradient_checkpointing_disable()
    result = recover(state["model"], state["tok"], None, cfg, None, progress=False, teacher=state["teacher"])
    state["peft"] = result.model
    return {"tokens_per_second": result.tokens_per_second, "gradient_checkpointing": checkpointing,
            "micro_batch": cfg.micro_batch_size, "cutoff_len": cfg.cutoff_len, "kd_chunk_size": cfg.kd_chunk_size,
            "student_dtype": dtype_name(state["model"]), "teacher_dtype": dtype_name(state["teacher"])}


def strip_adapters(model) -> None:
    """Put every PEFT LoRA layer's base layer back in its place (what PeftModel.unload does, without the wrapper)."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, module.get_base_layer())
    model.__dict__.pop("peft_config", None)  # PEFT's mark of a model it wrapped


def stage_merge(state: dict, s: dict) -> dict:
    """The teacher is dropped first (a merge runs after training); merged in float64 (rora's default), cast to
    bf16 on GPU."""
    from rora.config import MergeConfig
    from rora.recovery.merge import merge

    state.pop("teacher", None)
    reset_peak()
    if "peft" not in state:
        raise RuntimeError("no trained adapter to merge (both kd stages failed or were skipped)")
    cfg = MergeConfig(dtype="bfloat16" if CUDA else "float32")
    state["merged"], report = merge(state.pop("peft"), config=cfg)
    return {"max_abs_diff": report.max_abs_diff, "tolerance": report.tolerance, "settings": cfg.to_dict()}


def stage_loglik(state: dict, s: dict) -> dict:
    """rora's log-likelihood engine on synthetic 4-choice examples (random contexts, 1-5 token continuations)."""
    from rora.evaluation.loglik import pack, score_rows

    rng, vocab = random.Random(SEED), s["shape"]["vocab"]
    rows = []
    for _ in range(s["loglik_examples"]):
        context = [rng.randrange(2, vocab) for _ in range(rng.randint(*s["context"]))]
        rows.append(pack([(context, [rng.randrange(2, vocab) for _ in range(rng.randint(1, 5))]) for _ in range(4)]))
    model = state["merged"] if "merged" in state else state["model"]
    t0 = time.perf_counter()
    scores = score_rows(model, rows, pad_id=state["tok"].pad_token_id)
    seconds = time.perf_counter() - t0
    return {"examples": len(rows), "examples_per_second": len(rows) / seconds, "model": "merged" if "merged" in state
            else "pruned", "all_finite": all(math.isfinite(lp) for r in scores for lp, _ in r)}


STAGE_FUNCTIONS = {"build": stage_build, "prune": stage_prune, "reconstruct": stage_reconstruct, "kd": stage_kd,
                   "kd-checkpointing": lambda state, s: stage_kd(state, s, checkpointing=True),
                   # the student `rora recover` and `rora run` load: fp32 (bf16 autocast)
                   "kd-fp32-student": lambda state, s: stage_kd(state, s, dtype=torch.float32),
                   "merge": stage_merge, "loglik": stage_loglik}


def run_7b(mode: str, work: Path, deadline: float, result: Path) -> None:
    """Every stage in order, each timed with its peak memory; a failure is recorded and the next stage runs."""
    s, state, stages = SEVEN_B[mode], {"work": work}, {}
    for name in STAGE_RESERVE_S:
        reserve = STAGE_RESERVE_S[name] if mode == "full" else 0
        if time.time() + reserve > deadline:
            stages[name] = {"skipped": f"less than {reserve} s of the budget left"}
        else:
            say(f"7b: {name}")
            reset_peak()
            t0 = time.perf_counter()
            try:
                row = STAGE_FUNCTIONS[name](state, s)
            except Exception as exc:  # noqa: BLE001 - any failure (OOM included) is a figure of the table
                row = {"error": f"{type(exc).__name__}: {exc}"[:1500]}
            stages[name] = {"seconds": time.perf_counter() - t0, "peak_gib": peak_gib(), **row}
            say(f"7b: {name} done in {stages[name]['seconds']:.1f} s, peak {stages[name]['peak_gib']:.2f} GiB"
                + (f", {row['error']}" if "error" in row else ""))
        result.write_text(json.dumps({"stages": stages}))  # kept if the process is stopped later


# ---- the parent: sides and stages in child processes, goals, outputs ------------------------------------------------
def run_child(args, job: dict, work: Path, timeout: float) -> dict:
    """`job` ({"side": NAME} or {"7b": true}, maybe "profile" and "deadline") in a child process; what it left in its
    result file, or its error."""
    result = work / f"result-{job.get('side', '7b')}.json"
    spec = {**job, "tiny": args.tiny, "work": str(work), "result": str(result), "out": str(args.out)}
    try:
        code = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], timeout=max(timeout, 5),
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}).returncode
    except subprocess.TimeoutExpired:
        code = "killed at the budget"
    found = json.loads(result.read_text()) if result.is_file() else {}
    return found if code == 0 or "stages" in found else {"error": found.get("error") or f"exit {code} (see the log)"}


def child(spec: dict) -> None:
    """A side (or the 7B stages) in this process; its figures, or its error, go to the result file."""
    mode, work, result = "tiny" if spec["tiny"] else "full", Path(spec["work"]), Path(spec["result"])
    if "side" not in spec:
        return run_7b(mode, work, spec["deadline"], result)
    try:
        row = run_side(spec["side"], mode, work, Path(spec["out"]) if spec.get("profile") else None)
    except Exception as exc:  # noqa: BLE001 - the parent records it and goes on with the next side
        result.write_text(json.dumps({"error": f"{type(exc).__name__}: {exc}"[:1500]}))
        raise
    result.write_text(json.dumps(row))


def speed_part(args, mode: str, deadline: float, work: Path, peak_measured: float) -> dict:
    s, sides = SPEED[mode], {}
    estimate = SIDE_RESERVE_S if mode == "full" else 0
    for side in args.sides:
        if side == "rora-sft-fp32" and not CUDA:
            sides[side] = {"skipped": "on CPU every side trains an fp32 student"}
        elif time.time() + estimate > deadline:
            sides[side] = {"skipped": f"less than {estimate:.0f} s of the budget left"}
        else:
            say(f"speed: {side}")
            t0 = time.time()
            sides[side] = run_child(args, {"side": side}, work, deadline - time.time())
            estimate = max(estimate, time.time() - t0)
            say(f"speed: {side}: {json.dumps(sides[side])}")
    for side, row in sides.items():
        if "tokens_per_second" in row:
            row["flops_per_token"] = flops_per_token(s["shape"], s["seq"], side.endswith("kd"))
            achieved = row["flops_per_token"] * row["tokens_per_second"] / 1e12
            row.update(tflops=achieved, mfu=achieved / args.peak_tflops, mfu_measured_peak=achieved / peak_measured)
    settings = {**{k: v for k, v in s.items() if k != "shape"}, "method": "rora", "rank": RANK, "lr": LR,
                "seed": SEED, "optimizer": "AdamW", "autocast": "bf16" if CUDA else "none (fp32)"}
    return {"shape": s["shape"], "settings": settings, "matmul_parameters": matmul_parameters(s["shape"]),
            "sides": sides, "goals": goals(sides)}


def goals(sides: dict) -> list[dict]:
    """The issue's goals, each with its measured value (None when a side is missing) and whether it is met."""
    def ratio(a: str, b: str, key: str):
        x, y = sides.get(a, {}).get(key), sides.get(b, {}).get(key)
        return x / y if x is not None and y else None

    found = [("rora sft tokens/s / HF Trainer's", ratio("rora-sft", "hf-trainer", "tokens_per_second"), ">=", 1.5),
             ("rora kd tokens/s / the naive KD loop's", ratio("rora-kd", "naive-kd", "tokens_per_second"), ">=", 1.5),
             ("rora kd peak memory / the naive KD loop's", ratio("rora-kd", "naive-kd", "peak_gib"), "<=", 0.6),
             ("rora sft MFU", sides.get("rora-sft", {}).get("mfu"), ">=", 0.3),
             ("rora kd MFU", sides.get("rora-kd", {}).get("mfu"), ">=", 0.3)]
    return [{"goal": g, "value": v, "target": f"{op} {t}",
             "met": None if v is None else v >= t if op == ">=" else v <= t} for g, v, op, t in found]


def seven_b_part(args, mode: str, deadline: float, work: Path) -> dict:
    s = SEVEN_B[mode]
    found = run_child(args, {"7b": True, "deadline": deadline}, work, deadline - time.time() + 60)
    stages = found.get("stages", {})
    stages.update({n: {"skipped": "the process ended first"} for n in STAGE_RESERVE_S if n not in stages})
    over = {card: [n for n, r in stages.items() if r.get("peak_gib", 0) > gib] for card, gib in CARDS_GIB.items()}
    return {"shape": s["shape"], "settings": {k: v for k, v in s.items() if k != "shape"}, "stages": stages,
            "stages_over_card": over, **({"error": found["error"]} if "error" in found else {})}


def markdown(data: dict) -> str:
    env, tiny = data["environment"], data["mode"] == "tiny"
    lines = [f"## One GPU: speed and memory at real shapes ({env['device']})", "", f"- command: `{data['command']}`",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v),
             f"- memory: {MEMORY_KIND}; matmul peak measured {data['matmul_peak_tflops']:.1f} TFLOP/s "
             f"({'bf16' if CUDA else 'fp32'}), MFU against {data['peak_tflops']:g} TFLOP/s and against it", ""]
    if "speed" in data:
        sp = data["speed"]
        lines += [f"### {'Tiny' if tiny else 'Sheared-LLaMA-1.3B'} shape, {sp['settings']['batch']} x "
                  f"{sp['settings']['seq']} tokens per step", "",
                  "| side | tokens/s | peak GiB | TFLOP/s | MFU | MFU (measured peak) | held-out loss | KL |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for side, r in sp["sides"].items():
            if "tokens_per_second" not in r:
                lines.append(f"| {side} | {r.get('skipped') or r.get('error')} |||||||")
                continue
            kl = f"{r['heldout_kl']:.4f}" if r["heldout_kl"] is not None else ""
            lines.append(f"| {side} | {r['tokens_per_second']:,.0f} | {r['peak_gib']:.2f} | {r['tflops']:.1f} | "
                         f"{r['mfu']:.1%} | {r['mfu_measured_peak']:.1%} | {r['heldout_loss']:.4f} | {kl} |")
        lines.append("")
        for g in sp["goals"]:
            value = "n/a" if g["value"] is None else f"{g['value']:.2f}"
            lines.append(f"- {g['goal']}: {value} (goal {g['target']}): "
                         + ("n/a" if g["met"] is None else "met" if g["met"] else "MISSED"))
        lines.append("")
    if "7b" in data:
        lines += [f"### {'Tiny' if tiny else 'LLaMA-7B'} shape, {str(TRAIN_DTYPE).removeprefix('torch.')}", "",
                  "| stage | seconds | peak GiB | figures |", "|---|---:|---:|---|"]
        for name, r in data["7b"]["stages"].items():
            figures = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()
                                if k not in ("seconds", "peak_gib", "settings"))
            lines.append(f"| {name} | {r.get('seconds', 0):.1f} | {r.get('peak_gib', 0):.2f} | {figures} |")
        lines.append("")
        lines += [f"- a {card} card: " + (f"over it: {', '.join(over)}" if over else "every stage fits")
                  for card, over in data["7b"]["stages_over_card"].items()]
    if "profile" in data:
        found = data["profile"]
        where = found.get("profile") or found.get("skipped") or found.get("error")
        lines += ["", f"torch.profiler, top-20 ops: {where}"]
    return "\n".join(lines) + "\n"


def publish(data: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    (out / "gpu.md").write_text(markdown(data))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="speed,7b", help="a comma list of speed (part 1) and 7b (part 2)")
    ap.add_argument("--sides", default=",".join(SIDES), help=f"part 1's sides, a comma list of {', '.join(SIDES)}")
    ap.add_argument("--out", type=Path, default=RESULTS, help="where gpu.json, gpu.md and profiles are written")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes and a few steps (CPU; the test)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip what would not end within this many seconds")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="the device's bf16 dense peak (H200: 989)")
    ap.add_argument("--profile", choices=SIDES, help="at the end, run this side again under torch.profiler (its "
                                                     "top-20 ops into --out), if the budget allows")
    ap.add_argument("--child", type=json.loads, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.parts, args.sides = args.parts.split(","), [s for s in args.sides.split(",") if s]
    unknown = sorted(set(args.sides) - set(SIDES)) + sorted(set(args.parts) - {"speed", "7b"})
    if unknown:
        ap.error(f"unknown side or part: {', '.join(unknown)}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        return child(args.child)
    mode, deadline = "tiny" if args.tiny else "full", T0 + args.budget_s
    data = {"command": "python benchmarks/bench_gpu.py " + " ".join(sys.argv[1:]), "mode": mode,
            "environment": environment(), "budget_s": args.budget_s, "peak_tflops": args.peak_tflops,
            "memory": MEMORY_KIND, "device_memory_gib": torch.cuda.mem_get_info()[1] / 2**30 if CUDA else None}
    say(f"{data['environment']['device']}, torch {torch.__version__}; {mode} shapes; parts {', '.join(args.parts)}")
    args.out.mkdir(parents=True, exist_ok=True)
    data["matmul_peak_tflops"] = matmul_peak_tflops()
    say(f"matmul peak: {data['matmul_peak_tflops']:.1f} TFLOP/s")
    with tempfile.TemporaryDirectory() as tmp:
        if "speed" in args.parts:  # with both parts, the 7B stages keep half of the budget
            half = T0 + args.budget_s / 2 if "7b" in args.parts and mode == "full" else deadline
            data["speed"] = speed_part(args, mode, half, Path(tmp), data["matmul_peak_tflops"])
            publish(data, args.out)
        if "7b" in args.parts:
            data["7b"] = seven_b_part(args, mode, deadline, Path(tmp))
        if args.profile:  # last: what the measurements left of the budget
            late = time.time() + (SIDE_RESERVE_S if mode == "full" else 0) > deadline
            data["profile"] = {"skipped": "no budget left"} if late else run_child(
                args, {"side": args.profile, "profile": True}, Path(tmp), deadline - time.time())
    data["total_seconds"] = time.time() - T0
    publish(data, args.out)
    print(markdown(data), flush=True)


if __name__ == "__main__":
    main()
