"""The bad input battery: every mistake a user can type gets one `error:` line, exit code 2, no
traceback, and changes nothing on disk.

Each case runs `python -m pipelines ...` as a subprocess in its own copy of a working folder that
already holds a finished tiny run: conf/tiny.yaml, corpus/, the token cache data/, runs/existing/
(checkpoints, config.yaml, run.json), mlflow.db and mlartifacts/. Every file and folder under it
(and under the original it was copied from: artifact paths in mlflow.db point there) is hashed
before and after; "nothing changed" means no file modified, created or deleted.

The table is the README's troubleshooting list: a row's `error` is a regular expression that the one
line must match, naming what is wrong and how to fix it.

A fresh `python -m pipelines` spends ~6 s importing Lightning and MLflow before refusing in
milliseconds, so the cases run in a zygote (tests/pipelines/scripts/cli_zygote.py): one clean
interpreter, started once with the jobs imported, forks a child per case that runs `python -m
pipelines` as a fresh process would (its own cwd, argv, fds 1 and 2 on files, normal exit with
atexit). test_the_zygote_answers_like_a_fresh_process checks it against real processes.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from tests.pipelines.conftest import (DEBUG_RECIPE, VOCAB_SIZE, JobResult, TrainJob, free_port, snapshot_diff,
                                      tree_snapshot)

TINY = ("train", "conf/tiny.yaml")  # the recipe of the existing run
EXISTING = "runs/existing/checkpoints"
REFUSE_WITHIN_S = 60  # a bad input is refused at once: no retries, no tokenizing first
HUGE_LINE_BYTES = 20_000_000
ZYGOTE = Path(__file__).parent / "scripts" / "cli_zygote.py"
ZYGOTE_READY_S = 300  # its imports: ~6 s idle, far more on a loaded machine


@dataclass(frozen=True)
class Bad:
    id: str
    argv: Sequence[str]  # after `python -m pipelines`
    error: str  # a regex the one stderr line (after "error: ") must match
    setup: Callable[[Path], Sequence[str] | None] | None = None  # prepares the folder; may add arguments
    xfail: str = ""  # a known bug, with the fix it needs (strict: passing makes the test fail)
    needs_non_root: bool = False  # root reads any file whatever its permissions


# ---------------------------------------------------------------------------------------------
# What some cases put in the working folder first


def _write(name: str, content: str | bytes) -> Callable[[Path], None]:
    def setup(cwd: Path) -> None:
        path = cwd / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return setup


def _mkdir(name: str) -> Callable[[Path], None]:
    return lambda cwd: (cwd / name).mkdir()


def _delete(name: str) -> Callable[[Path], None]:
    return lambda cwd: shutil.rmtree(cwd / name) if (cwd / name).is_dir() else (cwd / name).unlink()


def _truncated_checkpoint(cwd: Path) -> None:
    whole = (cwd / EXISTING / "step-0000004.ckpt").read_bytes()
    (cwd / "truncated.ckpt").write_bytes(whole[: len(whole) // 2])


def _foreign_checkpoint(cwd: Path) -> None:
    """What another project's torch.save gives: tensors and plain data, but not our config."""
    torch.save({"state_dict": {"encoder.weight": torch.zeros(4, 4)}, "epoch": 3}, cwd / "other-project.ckpt")


class _RunsCode:
    """A pickle that would run `touch PWNED` when unpickled: weights_only must refuse it."""

    def __reduce__(self):
        return os.system, ("touch PWNED",)


def _checkpoint_with_code(cwd: Path) -> None:
    torch.save({"state_dict": {}, "hyper_parameters": _RunsCode()}, cwd / "downloaded.ckpt")


def _huge_jsonl_line(cwd: Path) -> None:
    """One 20 MB line of JSON, cut off before its end (a download that stopped)."""
    with open(cwd / "big.jsonl", "w") as f:
        f.write('{"text": "')
        f.write("many words " * (HUGE_LINE_BYTES // 11))


def _unreadable_file(cwd: Path) -> list[str]:
    """A file nobody may read, outside the working folder (the snapshot could not hash it)."""
    locked = cwd.parent / "locked" / "secret.txt"
    locked.parent.mkdir()
    locked.write_text("private notes")
    locked.chmod(0)
    return [f"data.sources=[corpus,{locked}]"]


def _closed_port(cwd: Path) -> list[str]:
    return [f"tracking.uri=http://127.0.0.1:{free_port()}"]  # bound then released: nobody listens


def _png() -> bytes:
    """A valid 1x1 red PNG image."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)  # width, height, 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00")) + chunk(b"IEND", b"")


RUSSIAN_CP1251 = ("Съешь же ещё этих мягких французских булок, да выпей чаю. " * 200).encode("cp1251")

# ---------------------------------------------------------------------------------------------
# The battery

BAD_INPUTS = [
    # Config: types, ranges, unknown keys, conflicting options, files, overrides
    Bad("config-wrong-type", (*TINY, "model.dim=abc"),
        r"bad config value for 'model\.dim': Value 'abc' .* converted to Integer: e\.g\. model\.dim=256"),
    Bad("config-zero-width", (*TINY, "model.dim=0"), r"model\.dim must be >= 1, got 0"),
    Bad("config-top-k-above-experts", (*TINY, "moe.router.top_k=5"),
        r"moe\.router\.top_k=5 exceeds moe\.num_experts=4: lower top_k or add experts"),
    Bad("config-heads-not-dividing-dim", (*TINY, "model.n_heads=5"),
        r"model\.dim=64 is not divisible by model\.n_heads=5"),
    Bad("config-capacity-factor-negative", (*TINY, "moe.capacity_factor=-1"),
        r"moe\.capacity_factor and moe\.eval_capacity_factor must be > 0"),
    Bad("config-negative-lr", (*TINY, "optim.lr=-0.001"), r"optim\.lr must be > 0, got -0\.001"),
    Bad("config-zero-steps", (*TINY, "trainer.max_steps=0"), r"trainer\.max_steps must be >= 1, got 0"),
    Bad("config-zero-batch", (*TINY, "trainer.batch_size=0"), r"trainer\.batch_size must be >= 1, got 0"),
    Bad("config-seq-len-above-max", (*TINY, "trainer.seq_len=128"),
        r"trainer\.seq_len=128 exceeds model\.max_seq_len=64"),
    Bad("config-misspelt-key", (*TINY, "model.dimm=3"), r"unknown config key 'model\.dimm' \(did you mean 'model\.dim'\?\)"),
    Bad("config-unknown-section", (*TINY, "trainr.max_steps=5"), r"unknown config key 'trainr' \(did you mean 'trainer'\?\)"),
    Bad("config-misspelt-key-in-file", ("train", "typo.yaml"),
        r"unknown config key 'trainer\.max_step' \(did you mean 'trainer\.max_steps'\?\)",
        _write("typo.yaml", "trainer:\n  max_step: 5\n")),
    Bad("config-bad-choice", (*TINY, "moe.router.kind=top_choice"),
        r"'moe\.router\.kind': Invalid value 'top_choice', expected one of \[token_choice, expert_choice, sequence\]"),
    Bad("config-expert-choice-dropless", (*TINY, "moe.router.kind=expert_choice", "moe.dropless=true"),
        r"expert_choice routing is capacity-based by definition: set moe\.dropless=false"),
    Bad("config-ep-not-dividing-processes", (*TINY, "parallel.ep=2"),
        r"parallel\.ep=2 must divide the number of processes \(trainer\.devices x parallel\.num_nodes = 1\)"),
    Bad("config-ep-not-dividing-experts", (*TINY, "parallel.ep=3", "trainer.devices=3"),
        r"parallel\.ep=3 must divide moe\.num_experts=4"),
    Bad("config-random-second-needs-top-2", (*TINY, "moe.router.random_second=true", "moe.router.top_k=1"),
        r"router\.random_second \(GShard\) needs router\.top_k=2"),
    Bad("config-file-missing", ("train", "conf/tinny.yaml"), r"config file not found: conf/tinny\.yaml \(see conf/"),
    Bad("config-file-not-yaml", ("train", "broken.yaml"),
        r"cannot parse broken\.yaml as YAML: mapping values are not allowed here at line 3, column 12: fix the file",
        _write("broken.yaml", "model:\n  dim: 64\n   n_layers: 2\n")),  # one space too many
    Bad("config-file-a-list", ("train", "list.yaml"), r"list\.yaml must hold a mapping of config sections",
        _write("list.yaml", "- model\n- moe\n")),
    Bad("config-override-without-equals", (*TINY, "model.dim"),
        r"override 'model\.dim' is not of the form key=value \(e\.g\. moe\.num_experts=16\)"),
    Bad("config-run-name-escapes", (*TINY, "run.name=../escape"),
        r"run\.name='\.\./escape' must be a plain folder name"),
    # Data: missing, empty, binary, other encodings, a huge broken line
    Bad("data-missing-source", (*TINY, "data.sources=[no-such-folder]"),
        r"corpus source 'no-such-folder' does not exist: fix the path in data\.sources"),
    Bad("data-empty-file", (*TINY, "data.sources=[empty.txt]"),
        r"corpus is empty: 1 file\(s\) \(empty\.txt\) hold no text; point data\.sources at files with text",
        _write("empty.txt", "")),
    Bad("data-empty-folder", (*TINY, "data.sources=[empty]"),
        r"corpus folder empty has no \.txt/\.md/\.jsonl files: add some", _mkdir("empty")),
    Bad("data-binary-file", (*TINY, "data.sources=[corpus,image.png]"),
        r"corpus file image\.png is not text \(it holds NUL bytes.*remove it from data\.sources", _write("image.png", _png())),
    Bad("data-utf16", (*TINY, "data.sources=[corpus,notes.txt]"),
        r"corpus file notes\.txt is UTF-16 text, not UTF-8: convert it, e\.g\. `iconv -f UTF-16 -t UTF-8",
        _write("notes.txt", "Notes saved by a Windows editor.\n".encode("utf-16"))),
    Bad("data-other-encoding", (*TINY, "data.sources=[corpus,russian.txt]"),
        # 46 Cyrillic letters in each 58-byte sentence, each one byte that is not UTF-8
        r"corpus file russian\.txt is not UTF-8 text \(9200 of its 11600 bytes .*convert it, e\.g\. `iconv",
        _write("russian.txt", RUSSIAN_CP1251)),
    Bad("data-unreadable-file", TINY,
        r"cannot read corpus file .*secret\.txt \(Permission denied\): fix its permissions or remove it from "
        r"data\.sources", _unreadable_file, needs_non_root=True),
    Bad("data-huge-broken-line", (*TINY, "data.sources=[big.jsonl]"),
        r"big\.jsonl line 1 is not valid JSON \(Unterminated string .*\): .* fix or remove that line", _huge_jsonl_line),
    # Checkpoints: another shape, damaged, foreign, dangerous, missing
    Bad("checkpoint-of-another-shape", (*TINY, "run.name=existing", "model.dim=128"),
        r"checkpoint .*step-0000004\.ckpt has model\.dim=64 but the config says 128: resume with the checkpoint's "
        r"config, or start a new run"),
    Bad("checkpoint-of-another-shape-no-token-cache", (*TINY, "run.name=existing", "model.dim=128"),
        r"has model\.dim=64 but the config says 128", _delete("data")),  # refused before tokenizing
    Bad("checkpoint-truncated", ("train", "--resume", "truncated.ckpt"),
        r"cannot read checkpoint truncated\.ckpt: truncated or not a checkpoint file", _truncated_checkpoint),
    Bad("checkpoint-text-file", ("train", "--resume", "notes.ckpt"),
        r"cannot read checkpoint notes\.ckpt: .*not a checkpoint file", _write("notes.ckpt", "step 4 was fine\n")),
    Bad("checkpoint-of-another-project", ("train", "--resume", "other-project.ckpt"),
        r"other-project\.ckpt carries no moe-lm config: it is not a checkpoint of this project", _foreign_checkpoint),
    Bad("checkpoint-with-code", ("train", "--resume", "downloaded.ckpt"),
        r"downloaded\.ckpt holds objects other than tensors and plain data: refused", _checkpoint_with_code),
    Bad("checkpoint-missing", ("train", "--resume", "runs/existing/checkpoints/step-0000099.ckpt"),
        r"checkpoint not found: runs/existing/checkpoints/step-0000099\.ckpt"),
    Bad("checkpoint-folder-not-a-checkpoint", ("train", "--resume", "runs/existing"),
        r"runs/existing is a folder but not a distributed checkpoint \(no meta\.pt\): give a checkpoint, e\.g\. "
        r"runs/<name>/checkpoints/last\.ckpt"),
    Bad("checkpoint-mlflow-run-missing", (*TINY, "run.name=existing", "trainer.max_steps=6"),
        r"the checkpoint's MLflow run [0-9a-f]{32} is not in sqlite:///\S+mlflow\.db: point tracking\.uri at the "
        r"store it was logged to, or .* tracking\.continue_run=false", _delete("mlflow.db")),
    # Command line
    Bad("cli-unknown-job", ("trian", "conf/tiny.yaml"), r"unknown job 'trian': choose one of info, train, eval"),
    Bad("cli-no-job", (), r"no job given: python -m pipelines <job> \[args\]; jobs: info, train, eval, compare, bench, "
        r"sync"),
    Bad("cli-resume-without-path", ("train", "--resume"),
        r"python -m pipelines train: argument --resume: expected one argument \(see `python -m pipelines train --help`\)"),
    Bad("cli-unknown-flag", (*TINY, "--fast"), r"unrecognized arguments: --fast \(see `python -m pipelines train --help`\)"),
    Bad("cli-eval-nonsense", ("eval", "banana"), r"config file not found: banana \(see conf/ for the recipes\)"),
    # Tracking
    Bad("tracking-unknown-scheme", (*TINY, "tracking.uri=ftp://example.com/mlflow"),
        r"tracking\.uri 'ftp://example\.com/mlflow' is not a tracking store MLflow can use: use "
        r"sqlite:///.*mlflow\.db or http\(s\)://"),
    Bad("tracking-file-store", (*TINY, "tracking.uri=file:./mlruns"),
        r"MLflow 3 does not accept the file store 'file:\./mlruns': use a database, e\.g\. tracking\.uri=sqlite:///"),
    Bad("tracking-server-unreachable", TINY,
        r"MLflow tracking server http://127\.0\.0\.1:\d+ is unreachable \(.*\): start it, or set tracking\.uri",
        _closed_port),
    Bad("tracking-sqlite-folder-missing", (*TINY, "tracking.uri=sqlite:///no/such/mlflow.db"),
        r"the folder of the MLflow database sqlite:///no/such/mlflow\.db does not exist: create no/such or change "
        r"tracking\.uri"),
]


def _marks(case: Bad) -> list:
    marks = [pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else []
    if case.needs_non_root:
        marks.append(pytest.mark.skipif(os.geteuid() == 0, reason="root can read a file without permissions"))
    return marks


# ---------------------------------------------------------------------------------------------
# The zygote


class Zygote:
    """tests/pipelines/scripts/cli_zygote.py, started once: `run` is TrainJob.run without the imports.

    Its child writes stdout and stderr to two files (in `outputs`) that are read back as text, as
    subprocess.run(text=True) decodes pipes.
    """

    def __init__(self, folder: Path):
        self.stderr_path = folder / "zygote.stderr"
        with open(self.stderr_path, "w") as err:
            # TrainJob.env() in a clean interpreter: pytest's warning filters and logging capture
            # would hide what a real process prints.
            self.proc = subprocess.Popen([sys.executable, str(ZYGOTE)], cwd=folder, env=TrainJob.env(),
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        self._received = b""
        self._ready = False

    def run(self, cwd: Path, args: Sequence[str], *, outputs: Path, timeout: float = REFUSE_WITHIN_S * 2,
            module: str = "pipelines") -> JobResult:
        """`python -m <module> <args>` in `cwd`, forked from the zygote; killed (a failure) after `timeout`."""
        if not self._ready:
            assert self._answer(ZYGOTE_READY_S, "importing the jobs") == {"ready": True, "pid": self.proc.pid}
            self._ready = True
        stdout, stderr = outputs / f"{cwd.name}.stdout", outputs / f"{cwd.name}.stderr"
        request = {"cwd": str(cwd), "argv": list(args), "stdout": str(stdout), "stderr": str(stderr),
                   "timeout": timeout, "module": module}
        start = time.perf_counter()
        self.proc.stdin.write(json.dumps(request).encode() + b"\n")
        self.proc.stdin.flush()
        answer = self._answer(timeout + 30, f"running {args}")  # it kills the child at `timeout` itself
        result = JobResult(["(zygote)", "python", "-m", module, *args], answer["returncode"], stdout.read_text(),
                           stderr.read_text(), time.perf_counter() - start)
        if answer["timed_out"]:
            pytest.fail(f"killed after {timeout} s{result.explain()}")
        return result

    def _answer(self, timeout: float, doing: str) -> dict:
        """The zygote's next line, read from the raw fd (select works on it) within `timeout`."""
        deadline, fd = time.monotonic() + timeout, self.proc.stdout.fileno()
        while b"\n" not in self._received:
            left = deadline - time.monotonic()
            chunk = os.read(fd, 65536) if left > 0 and select.select([fd], [], [], left)[0] else None
            if not chunk:
                self.proc.kill()
                pytest.fail(f"the zygote {'exited' if chunk == b'' else f'did not answer within {timeout} s'} "
                            f"while {doing}:\n{self.stderr_path.read_text()[-3000:]}")
            self._received += chunk
        line, self._received = self._received.split(b"\n", 1)
        return json.loads(line)

    def close(self) -> tuple[int, str]:
        """End it (EOF on its stdin); its exit code and everything it printed itself."""
        self.proc.stdin.close()
        try:
            code = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        return code, self.stderr_path.read_text()


@pytest.fixture(scope="module")
def zygote(tmp_path_factory) -> Iterator[Zygote]:
    """One zygote for the module, checked at the end: it exited 0 and printed nothing itself."""
    zygote = Zygote(tmp_path_factory.mktemp("zygote"))  # imports while `existing` trains
    try:
        yield zygote
    finally:
        code, stderr = zygote.close()
    # A warning or message printed at import would be in every real process's stderr, not in the cases'.
    assert (code, stderr) == (0, ""), f"the zygote exited {code}, printing (missing from every case):\n{stderr[-3000:]}"


# ---------------------------------------------------------------------------------------------
# The working folder with a finished run, and the check


@pytest.fixture(scope="module")
def existing(tmp_path_factory, corpus: Path, train_job: TrainJob) -> Path:
    """A folder where `python -m pipelines train conf/tiny.yaml run.name=existing` has finished."""
    cwd = tmp_path_factory.mktemp("existing")
    shutil.copytree(corpus, cwd / "corpus")
    recipe = yaml.safe_load(DEBUG_RECIPE.read_text())
    recipe["data"].update(sources=["corpus"], vocab_size=VOCAB_SIZE, cache_dir="data")  # all inside the folder
    recipe["trainer"].update(max_steps=4, ckpt_every=2, val_every=2, log_every=1, progress_bar=False)
    (cwd / "conf").mkdir()
    (cwd / "conf" / "tiny.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    result = train_job.run(cwd, [*TINY, "run.name=existing"])
    assert result.returncode == 0, result.explain()
    assert (cwd / EXISTING / "step-0000004.ckpt").is_file() and (cwd / "mlflow.db").is_file()
    return cwd


def _run_case(case: Bad, existing: Path, folder: Path,
              run: Callable[[Path, Sequence[str]], JobResult]) -> tuple[JobResult, list[str]]:
    """The case in a copy of `existing` at <folder>/work: what `run` gave, and the files it changed."""
    cwd = folder / "work"
    shutil.copytree(existing, cwd, symlinks=True)
    extra = case.setup(cwd) if case.setup else None
    before = tree_snapshot(cwd, existing)
    result = run(cwd, [*case.argv, *(extra or [])])
    return result, snapshot_diff(before, tree_snapshot(cwd, existing))


def test_the_battery_has_at_least_30_cases_and_unique_ids():
    assert len(BAD_INPUTS) >= 30
    assert len({case.id for case in BAD_INPUTS}) == len(BAD_INPUTS)


@pytest.mark.parametrize("case", [pytest.param(case, id=case.id, marks=_marks(case)) for case in BAD_INPUTS])
def test_bad_input_gives_one_error_line_exit_2_and_changes_nothing(case: Bad, zygote: Zygote, existing: Path,
                                                                   tmp_path: Path):
    result, changes = _run_case(case, existing, tmp_path, lambda cwd, args: zygote.run(cwd, args, outputs=tmp_path))

    output = result.stdout + result.stderr
    assert "Traceback" not in output, result.explain()
    assert result.returncode == 2, result.explain()
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), f"not one error line{result.explain()}"
    assert result.stdout == "", result.explain()
    assert re.search(case.error, lines[0].removeprefix("error: ")), f"the line does not match {case.error!r}{result.explain()}"
    assert changes == [], f"the failed job changed files: {changes}{result.explain()}"
    assert result.seconds < REFUSE_WITHIN_S, result.explain()


# ---------------------------------------------------------------------------------------------
# The zygote against real processes


@pytest.mark.parametrize("case_id", [
    "cli-unknown-job",  # imports no job
    "checkpoint-of-another-shape",  # imports train, takes the run lock: its file goes at exit (atexit)
])
def test_the_zygote_answers_like_a_fresh_process(case_id: str, zygote: Zygote, existing: Path, train_job: TrainJob,
                                                 tmp_path: Path):
    """The same case in two copies of the folder: a real `python -m pipelines` and the zygote's child
    give the same exit code, stdout and stderr, and both change nothing."""
    case = next(case for case in BAD_INPUTS if case.id == case_id)
    fresh, fresh_changes = _run_case(case, existing, tmp_path / "fresh",
                                     lambda cwd, args: train_job.run(cwd, args, timeout=REFUSE_WITHIN_S * 2))
    forked, forked_changes = _run_case(case, existing, tmp_path / "zygote",
                                       lambda cwd, args: zygote.run(cwd, args, outputs=tmp_path))
    assert fresh.returncode == 2 and fresh_changes == [], fresh.explain()  # the case is what the battery says
    seen = [(r.returncode, r.stdout, r.stderr.replace(str(tmp_path / how), "<tmp>"), changes)
            for r, how, changes in ((fresh, "fresh", fresh_changes), (forked, "zygote", forked_changes))]
    assert seen[1] == seen[0], f"\nfresh:{fresh.explain()}\nzygote:{forked.explain()}"


def test_the_zygote_child_behaves_as_a_fresh_python_m_process(zygote: Zygote, tmp_path: Path):
    """tests/pipelines/scripts/zygote_probe.py prints what a fork could get wrong: buffering, output
    below Python, a warning, argv, cwd, sys.path, stdin, an uncaught exception's traceback and exit
    code, an atexit handler after it. Run by a real interpreter and by the zygote: byte-identical."""
    probe, args = "tests.pipelines.scripts.zygote_probe", ["one", "two words"]
    fresh = subprocess.run([sys.executable, "-m", probe, *args], cwd=tmp_path, env=TrainJob.env(),
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    (tmp_path / "outputs").mkdir()
    forked = zygote.run(tmp_path, args, outputs=tmp_path / "outputs", module=probe)
    # The probe shows what it should: otherwise the comparison proves little.
    assert fresh.returncode == 1 and "fd 1: written below Python" in fresh.stdout, fresh.stdout
    assert "Traceback (most recent call last)" in fresh.stderr and "UserWarning: a warning" in fresh.stderr
    assert fresh.stderr.endswith("RuntimeError: uncaught: the interpreter prints the traceback and exits 1\n"
                                 "atexit: ran after the traceback\n"), fresh.stderr
    assert f"cwd={tmp_path} path0={tmp_path} stdin=b''" in fresh.stdout, fresh.stdout
    assert (forked.returncode, forked.stdout, forked.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)
