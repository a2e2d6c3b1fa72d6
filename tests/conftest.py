"""Shared fixtures: tiny random Llama-family models built in-process, a tiny real tokenizer, the data dir."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("RORA_DATA_DIR") or REPO.parent / "shared" / "data" / "commonsense")

def even_odd_records(n: int = 60) -> list[dict]:
    """A learnable recovery task: the answer is 'true' for even numbers, 'false' for odd."""
    return [{"instruction": f"Is {i} even? Answer true or false.", "input": "",
             "output": f"the correct answer is {'true' if i % 2 == 0 else 'false'}"} for i in range(n)]


def tiny_recover_config(**kw):
    """A RecoverConfig sized for tiny models: a few steps, checkpoints and evaluations every 2."""
    from rora.config import RecoverConfig

    base = dict(rank=4, max_steps=8, batch_size=4, micro_batch_size=2, val_set_size=8, eval_steps=2, save_steps=2,
                warmup_steps=0, lr=5e-3, seed=7)
    return RecoverConfig(**{**base, **kw})


def subprocess_env(**extra) -> dict:
    """The environment for a test's child process: this checkout's rora, offline, one thread."""
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1", **extra}


# A child process that runs recover() (optionally with a teacher), for SIGKILL/resume and DDP tests.
RECOVER_WORKER = """
import json, os, sys, time
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from rora.config import RecoverConfig
from rora.recovery.trainer import recover
model_dir, teacher_dir, data, out, cfg = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
if os.environ.get("SLOW_STEPS"):  # make steps slow enough that the test can SIGKILL mid-run
    step = torch.optim.AdamW.step
    def slow(self, *a, **k):
        time.sleep(float(os.environ["SLOW_STEPS"]))
        return step(self, *a, **k)
    torch.optim.AdamW.step = slow
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32) if teacher_dir != "-" else None
tok = AutoTokenizer.from_pretrained(model_dir)
r = recover(model, tok, data, RecoverConfig(**cfg), out, resume=os.environ.get("RESUME") == "1", progress=False,
            teacher=teacher)
if os.environ.get("RESULT_DIR"):  # one file per process: two processes' lines can interleave on a shared pipe
    path = os.path.join(os.environ["RESULT_DIR"], "rank-" + os.environ.get("RANK", "0") + ".json")
    with open(path, "w") as f:
        json.dump(r.to_dict(), f)
"""


def recover_worker(root: Path, model_dir, teacher_dir, out, cfg: dict, **env):
    """(argv, env) running RECOVER_WORKER (written to root/worker.py) on root/data.json into `out`."""
    import json
    import sys

    worker = root / "worker.py"
    if not worker.is_file():
        worker.write_text(RECOVER_WORKER)
    return [sys.executable, str(worker), str(model_dir), str(teacher_dir or "-"), str(root / "data.json"), str(out),
            json.dumps(cfg)], subprocess_env(**env)


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every process below it: a launcher's workers (torchrun starts each in its own
    session, so killing the launcher's process group would leave them training)."""
    import psutil

    root = psutil.Process(pid)
    for proc in [*root.children(recursive=True), root]:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def assert_sigkill_resume_is_bit_identical(worker, full: Path, killed: Path, steps: int,
                                           kill_at: str = "checkpoints/step-4") -> tuple[dict, dict]:
    """Run `worker(out, **env)` uninterrupted into `full`; run it into `killed`, SIGKILL it (with every process it
    started) once the checkpoint `kill_at` (step 4; checkpoints/probe: an --lr auto probe) is written, resume it; the
    adapters must be bit-identical and the metrics must log each step once. Returns the two manifests for the caller's
    own checks."""
    import json
    import signal
    import subprocess
    import time

    from safetensors.torch import load_file

    from rora.recovery.trainer import partial_dir

    cmd, env = worker(full)
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=180)
    cmd, env = worker(killed, SLOW_STEPS="0.4")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (partial_dir(killed) / kill_at / "trainer_state.json").is_file() and time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    kill_tree(proc.pid)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (killed / "adapter").exists()
    cmd, env = worker(killed, RESUME="1")
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=180)
    for name in ("adapter/adapter_model.safetensors", "checkpoints/best/adapter/adapter_model.safetensors"):
        a, b = load_file(full / name), load_file(killed / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    first, resumed = (json.loads((d / "rora.json").read_text())["report"] for d in (full, killed))
    assert (resumed["best_val_loss"], resumed["best_step"], resumed["steps"]) == (first["best_val_loss"], first["best_step"], steps)
    logged = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == list(range(1, steps + 1))  # the killed run's extra lines replaced
    return first, resumed


def run_two_processes(cmd: list[str], env: dict, result_dir: Path, port: int) -> list[dict]:
    """Run a recover_worker command as 2 data-parallel processes (torchrun); each process's result, tokens/s
    (its own clock) left out, in rank order."""
    import json
    import subprocess
    import sys

    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), *cmd[1:]]
    result_dir.mkdir()
    done = subprocess.run(launch, env={**env, "RESULT_DIR": str(result_dir)}, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in sorted(result_dir.glob("rank-*.json"))]
    for r in results:
        r.pop("tokens_per_second")
    return results


_CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction: Please answer the following question with true or false. ### Response:",
    "the correct answer is true false answer1 answer2 answer3 answer4 answer5 solution1 solution2 option1 option2",
    "ending1 ending2 ending3 ending4 The capital of France is Paris. A cat sat on the mat.",
]


def make_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer trained in-process (no downloads), with eos/pad tokens like a chat model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )


def make_model(arch: str = "llama", *, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 4,
               intermediate: int = 96, vocab: int = 384, seed: int = 0, tie: bool = False):
    """A tiny random causal LM of a Llama-family architecture, fp32, eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        arch,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init gives near-zero std weights in some versions; make every unit matter for pruning tests.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model.eval()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls on a shared CPU are far faster on one thread (no spin-waiting on busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def tiny_llama():
    """Multi-head attention: 4 query heads, 4 KV heads."""
    return make_model("llama")


@pytest.fixture
def tiny_gqa():
    """Grouped-query attention: 4 query heads over 2 KV heads (like SmolLM2's 9 over 3)."""
    return make_model("llama", heads=4, kv_heads=2)


@pytest.fixture
def tiny_nonuniform():
    """Different head counts and MLP widths per layer, as non-uniform pruning leaves a model."""
    from rora.architecture import keep_units, layer_shapes, sync_config

    model = make_model("llama", layers=3, heads=4, kv_heads=2)
    layers = model.model.layers
    keep_units(layers[0], model.config, keep_q=[0, 2], keep_kv=[0, 1], keep_channels=list(range(0, 96, 2)))
    keep_units(layers[2], model.config, keep_q=[2, 3], keep_kv=[1], keep_channels=list(range(80)))
    sync_config(model.config, layer_shapes(model))
    return model


@pytest.fixture(params=["llama", "mistral", "qwen2"])
def tiny_any(request):
    """One tiny model per supported architecture (Qwen2 has biases on q/k/v)."""
    return make_model(request.param, heads=4, kv_heads=2)


@pytest.fixture(scope="session")
def data_dir():
    if not (DATA_DIR / "boolq" / "test.json").is_file():
        pytest.skip(f"commonsense data not found at {DATA_DIR} (set RORA_DATA_DIR)")
    return DATA_DIR


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded model (loaded once per session; the first load converts the GGUF, ~30 s)."""
    from rora.models import load_model

    return load_model("smollm2-135m")


def save_student_and_teacher(root: Path, records: list[dict]) -> Path:
    """root/student (tiny model, seed 0), root/teacher (seed 1), each with its tokenizer, and root/data.json: what
    a child process that recovers with a teacher reads."""
    import json

    for name, seed in (("student", 0), ("teacher", 1)):
        make_model(seed=seed).save_pretrained(root / name)
        make_tokenizer().save_pretrained(root / name)
    (root / "data.json").write_text(json.dumps(records))
    return root
