"""Issue #29: the last holes. Each root cause: exit 2, one line naming the file or field, no traceback, and
nothing changed on disk (or, for a failed write, the last good state kept and nothing half-written)."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import transformers as T

from test_errors import assert_one_line, cli, snapshot, write_config
from helpers import make_run_assets
from lisatune.recipe import loop
from lisatune.recipe.checkpoint import load_checkpoint, verify
from lisatune.recipe.config import load_config


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_run_assets(tmp_path_factory.mktemp("assets"))


def finished_run(tmp_path, assets, name="run", **train):
    cfg = write_config(tmp_path, assets, name=name, **train)
    loop.train(load_config(str(cfg), []))
    return cfg, tmp_path / name


def as_if_killed_before(run: Path, step: int) -> None:
    """Remove what a run wrote after its checkpoint `step`: the later checkpoints, final/ and summary.json."""
    shutil.rmtree(run / "final")
    (run / "summary.json").unlink()
    for d in (run / "checkpoints").iterdir():
        if int(d.name.split("-")[1]) > step:
            shutil.rmtree(d)


# -- 1. any exception while a checkpoint is written is a failed write -------------------------------------------
def test_a_full_disk_inside_torch_save_keeps_the_last_good_checkpoint(tmp_path, assets, capsys, monkeypatch):
    cfg, run = finished_run(tmp_path, assets, save_every=2, keep_last=5)
    as_if_killed_before(run, 2)
    ckpts = run / "checkpoints"
    before = snapshot(ckpts)
    real_save = torch.save

    def disk_full(obj, f, *a, **k):  # half a file on disk, then torch's own error for a full disk
        if Path(f).name == "optimizer.pt":
            Path(f).write_bytes(b"PK\x03\x04partial")
            raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 4416 vs 4310")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", disk_full)
    line = assert_one_line(*cli(capsys, "train", cfg, "--resume")[::2],
                           f"cannot write checkpoint step-000004 in {ckpts} (")
    assert "unexpected pos" in line and "the earlier checkpoints are intact" in line
    assert snapshot(ckpts) == before  # no step-000004, no .tmp-* directory, step-000002 byte for byte
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000002"]
    assert not [p for p in run.rglob(".tmp-*")]
    good = ckpts / "step-000002"
    verify(good, json.loads((good / "trainer_state.json").read_text())["sha256"],
           ["model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt"])
    load_checkpoint(good, T.AutoModelForCausalLM.from_pretrained(assets / "model"))
    monkeypatch.setattr(torch, "save", real_save)  # the disk has room again: the run finishes from step 2
    rc, _, err = cli(capsys, "train", cfg, "--resume")
    assert rc == 0, err
    assert json.loads((run / "summary.json").read_text())["steps"] == 4


# -- 2. run files rewritten atomically, never through a link ----------------------------------------------------
KILL_MID_REWRITE = """
import os, signal, sys
from pathlib import Path
from lisatune.recipe.metrics import Metrics
real_write = os.write
def half_then_kill(fd, data):  # the rewrite has put half its bytes on disk when the process is killed
    real_write(fd, bytes(data)[:len(data) // 2])
    os.kill(os.getpid(), signal.SIGKILL)
os.write = half_then_kill
Metrics(Path(sys.argv[1]), [], resume_step=2)
"""


def test_a_kill_while_metrics_jsonl_is_rewritten_loses_no_row(tmp_path, assets, capsys):
    from helpers import SUBPROCESS_ENV
    import subprocess
    import sys
    cfg, run = finished_run(tmp_path, assets, save_every=2, keep_last=5, eval_every=2)
    complete = (run / "metrics.jsonl").read_text()
    as_if_killed_before(run, 2)
    proc = subprocess.run([sys.executable, "-c", KILL_MID_REWRITE, str(run)], env=SUBPROCESS_ENV,
                          capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr  # killed mid-rewrite, as the red team's SIGKILL
    assert (run / "metrics.jsonl").read_text() == complete  # every row is still there
    assert [p.name for p in run.glob(".tmp-metrics.jsonl-*")]  # the half-written copy was a temporary file
    rc, _, err = cli(capsys, "train", cfg, "--resume")
    assert rc == 0, err
    assert not list(run.glob(".tmp-*"))  # the dead process's temporary file is cleaned up
    steps = lambda text: [(r["step"], sorted(r)) for r in map(json.loads, text.splitlines())]
    assert steps((run / "metrics.jsonl").read_text()) == steps(complete)  # rows up to 2 kept, 3-4 again, once


def test_an_exception_mid_rewrite_keeps_the_file_and_no_temp(tmp_path, assets, monkeypatch):
    from lisatune.recipe.metrics import Metrics
    _, run = finished_run(tmp_path, assets)
    complete = (run / "metrics.jsonl").read_text()
    real_write = os.write

    def fail_half_way(fd, data):
        real_write(fd, bytes(data)[:len(data) // 2])
        raise KeyboardInterrupt  # Ctrl-C in the middle of the rewrite

    monkeypatch.setattr(os, "write", fail_half_way)
    with pytest.raises(KeyboardInterrupt):
        Metrics(run, [], resume_step=2)
    monkeypatch.undo()
    assert (run / "metrics.jsonl").read_text() == complete
    assert not list(run.glob(".tmp-*"))


@pytest.mark.parametrize("name", ["metrics.jsonl", "summary.json", "config.yaml", "checkpoints/step-000004"])
def test_a_run_file_that_is_a_link_out_of_the_run_is_refused_and_its_target_untouched(tmp_path, assets, capsys,
                                                                                      name):
    cfg, run = finished_run(tmp_path, assets, save_every=2, keep_last=5)
    outside = tmp_path / "precious"
    link = run / name
    if link.is_dir():
        shutil.copytree(link, outside)
        shutil.rmtree(link)
    else:
        outside.write_text(link.read_text())
        link.unlink()
    link.symlink_to(outside)
    if name != "summary.json":  # as if killed after the step-2 checkpoint: a resume rewrites metrics.jsonl
        (run / "summary.json").unlink()
        shutil.rmtree(run / "final")
    before, outside_before = snapshot(run), snapshot(tmp_path / "precious") or outside.read_bytes()
    line = assert_one_line(*cli(capsys, "train", cfg, "--resume")[::2], f"{link} is a symbolic link (to {outside})")
    assert "never reads or writes a run's files through a link" in line
    assert snapshot(run) == before
    assert (snapshot(outside) or outside.read_bytes()) == outside_before


# -- 3. trainer_state.json validated as a whole; a check's key deleted from a current checkpoint is refused --------
def edit_state(ckpt: Path, **changes):
    f = ckpt / "trainer_state.json"
    state = json.loads(f.read_text())
    for k, v in changes.items():
        state.pop(k) if v is DELETE else state.__setitem__(k, v)
    f.write_text(json.dumps(state))


DELETE = object()


@pytest.mark.parametrize("changes,message", [
    ({"first_eval": "abc"}, "trainer_state.json: 'first_eval' must be null or a mapping of metric names to numbers"),
    ({"first_eval": {"eval_loss": "1.2"}}, "'first_eval' must be null or a mapping of metric names to numbers"),
    ({"last_eval": [1]}, "'last_eval' must be null or a mapping"),
    ({"micro_step": -1}, "'micro_step' must be an integer >= 0"),
    ({"data_fingerprint": "x"}, "'data_fingerprint' must be null or a mapping of data sources to sha256 digests"),
    ({"world_size": 0}, "'world_size' must be an integer >= 1"),
    ({"sha256": ["model.safetensors"]}, "'sha256' must map file names to sha256 digests"),
    ({"checkpoint_format": "1"}, "'checkpoint_format' must be an integer >= 1"),
    ({"checkpoint_format": 99}, "was written by a newer lisatune (checkpoint format 99"),
    ({"sha256": DELETE}, "trainer_state.json has no 'sha256' manifest, which every checkpoint of format 1 carries"),
    ({"data_fingerprint": DELETE}, "trainer_state.json has no 'data_fingerprint', which lisatune train writes"),
])
def test_a_bad_trainer_state_is_one_line_before_training(tmp_path, assets, capsys, monkeypatch, changes, message):
    cfg, run = finished_run(tmp_path, assets, save_every=2, keep_last=5)
    as_if_killed_before(run, 2)
    ckpt = run / "checkpoints" / "step-000002"
    edit_state(ckpt, **changes)
    monkeypatch.setattr(loop, "load_model", lambda *a: pytest.fail("the model loaded: the state was checked late"))
    before = snapshot(run)
    line = assert_one_line(*cli(capsys, "train", cfg, "--resume")[::2], message)
    assert str(ckpt) in line
    assert snapshot(run) == before


def test_an_older_checkpoint_without_the_marker_warns_and_resumes(tmp_path, assets, capsys, caplog):
    cfg, run = finished_run(tmp_path, assets, save_every=2, keep_last=5)
    as_if_killed_before(run, 2)
    edit_state(run / "checkpoints" / "step-000002", checkpoint_format=DELETE, sha256=DELETE,
               data_fingerprint=DELETE)
    rc, _, err = cli(capsys, "train", cfg, "--resume")
    assert rc == 0, err
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("predates checksums" in m and "loaded unverified" in m for m in warned), warned
    assert any("predates data fingerprints" in m for m in warned), warned
    assert all("\n" not in m for m in warned)
    assert json.loads((run / "summary.json").read_text())["steps"] == 4


# -- 4. the resume hint is the whole command; a finished run says so ----------------------------------------------
def test_the_resume_hint_after_sigterm_names_this_run_and_resumes_it(tmp_path, assets, capsys, monkeypatch):
    import shlex
    import signal
    cfg = write_config(tmp_path, assets)  # its own output_dir: tmp_path/run, which this run does not use
    out = tmp_path / "other dir"
    real = loop.train_step

    def terminated_at_2(run, stop):
        if run.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(run, stop)

    monkeypatch.setattr(loop, "train_step", terminated_at_2)
    rc, stdout, err = cli(capsys, "train", cfg, "--set", "train.seed=3", "--set", f"train.output_dir={out}",
                          "--set", "lisa.interval=2")
    assert rc == 130, err
    hint = stdout.split("continue with: ")[1].strip()
    assert shlex.split(hint) == ["lisatune", "train", str(cfg), "--set", "train.seed=3", "--set",
                                 f"train.output_dir={out}", "--set", "lisa.interval=2", "--resume"]
    monkeypatch.setattr(loop, "train_step", real)
    rc, stdout, err = cli(capsys, *shlex.split(hint)[1:])  # run as printed
    assert rc == 0, err
    assert "already complete" not in stdout
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
    assert not (tmp_path / "run").exists()  # the config's own output_dir was never touched


def test_a_second_interrupt_is_one_line_with_the_command(tmp_path, assets, capsys, monkeypatch):
    cfg = write_config(tmp_path, assets)

    def second_ctrl_c(run, stop):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "train_step", second_ctrl_c)
    rc, _, err = cli(capsys, "train", cfg, "--output-dir", tmp_path / "x")
    ours = [ln for ln in err.splitlines() if ln.startswith("lisatune:")]  # not the progress bars
    assert rc == 130 and "Traceback" not in err and len(ours) == 1, err
    assert ours[0].endswith(f"no checkpoint was written; start again with: lisatune train {cfg} --output-dir "
                                f"{tmp_path / 'x'}")


@pytest.mark.parametrize("state,message", [
    ("finished", "holds a finished run; to start a new one, pass --overwrite (replaces it) or choose another "
                 "output_dir (--output-dir DIR)"),
    ("unfinished", "holds an unfinished run (last checkpoint step-000002); pass --resume to continue it"),
])
def test_running_a_run_again_says_whether_it_finished(tmp_path, assets, capsys, state, message):
    cfg, run = finished_run(tmp_path, assets, save_every=2, keep_last=5)
    if state == "unfinished":
        as_if_killed_before(run, 2)
    before = snapshot(run)
    assert_one_line(*cli(capsys, "train", cfg)[::2], f"output_dir '{run}' {message}")
    assert snapshot(run) == before


# -- 5. lm-eval task files: code only with an opt-in; their errors name the file ---------------------------------
MC_TASK = """task: {name}
include: {shipped}
custom_dataset: !function {module}.choices
"""
RUNS_CODE = """from pathlib import Path
Path({marker!r}).write_text("task code ran")
from lisatune.tasks.gsm import choices
"""


@pytest.fixture
def code_task(tmp_path):
    """A task folder whose task imports Python that creates a file: what it must not do without an opt-in."""
    from lisatune.integrations import harness
    tasks, marker = tmp_path / "tasks", tmp_path / "ran"
    tasks.mkdir()
    (tasks / "mine.yaml").write_text(MC_TASK.format(name="mine", shipped=harness.TASKS_DIR / "lisatune_gsm_mc.yaml",
                                                    module="mycode"))
    (tasks / "mycode.py").write_text(RUNS_CODE.format(marker=str(marker)))
    return tasks, marker


def test_task_code_runs_only_with_the_opt_in(tmp_path, assets, capsys, code_task):
    pytest.importorskip("lm_eval")
    tasks, marker = code_task
    before = snapshot(tmp_path)
    args = ["eval", assets / "model", "--tasks", "mine", "--include-path", tasks, "--limit", "1"]
    line = assert_one_line(*cli(capsys, *args)[::2], f"lm-eval task file {tasks / 'mine.yaml'}:3: "
                           "'!function mycode.choices' imports and runs Python code")
    assert "--allow-task-code" in line
    assert not marker.exists() and snapshot(tmp_path) == before
    cfg = write_config(tmp_path, assets, eval_tasks=["mine"], eval_include_path=str(tasks), eval_limit=1)
    before = snapshot(tmp_path)
    assert_one_line(*cli(capsys, "train", cfg)[::2], "train.eval_allow_task_code: true")
    assert not marker.exists() and snapshot(tmp_path) == before
    rc, out, err = cli(capsys, "--quiet", *args, "--allow-task-code")  # opted in: it runs
    assert rc == 0, err
    assert marker.read_text() == "task code ran" and "lm_eval/mine/acc" in json.loads(out)


@pytest.mark.parametrize("content,message", [
    ("task: broken\ndataset_path: [unclosed\n", "bad.yaml:3: not valid YAML"),
    ("task: x\nprocess_docs: !function nowhere.fn\n", "bad.yaml:2: '!function nowhere.fn': no module nowhere.py "
                                                        "beside it, nor an installed one"),
    ("task: x\nprocess_docs: !custom 1\n", "bad.yaml:2: YAML tag '!custom' is not allowed"),
    ("task: x\nprocess_docs: !!python/name:os.system\n", "YAML tag 'tag:yaml.org,2002:python/name:os.system'"),
])
def test_a_broken_task_file_is_one_line_naming_it(tmp_path, assets, capsys, content, message):
    pytest.importorskip("lm_eval")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "bad.yaml").write_text(content)
    before = snapshot(tmp_path)
    assert_one_line(*cli(capsys, "eval", assets / "model", "--tasks", "broken", "--include-path", tasks,
                         "--allow-task-code")[::2], f"lm-eval task file {tasks / 'bad.yaml'}")
    assert_one_line(*cli(capsys, "eval", assets / "model", "--tasks", "broken", "--include-path", tasks,
                         "--allow-task-code")[::2], message)
    assert snapshot(tmp_path) == before


def test_the_opt_in_without_an_include_path_is_refused(tmp_path, assets, capsys):
    assert_one_line(*cli(capsys, "eval", assets / "model", "--tasks", "lisatune_gsm", "--allow-task-code")[::2],
                    "--allow-task-code has no effect without --include-path (it allows the code of task files there)")
    cfg = write_config(tmp_path, assets, eval_tasks=["lisatune_gsm"], eval_allow_task_code=True)
    assert_one_line(*cli(capsys, "train", cfg)[::2], "train.eval_allow_task_code has no effect without "
                    "train.eval_include_path")


# -- 6. max_length against the model's positions ------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt2_128(tmp_path_factory):
    """A GPT-2 with 128 learned positions (an example longer than that is an IndexError at the forward), and data
    with one example of several hundred tokens."""
    from helpers import RECORDS, tiny_tokenizer
    from lisatune.analysis.tiny import tiny_config
    root = tmp_path_factory.mktemp("gpt2")
    tok = tiny_tokenizer(chat=True)
    cfg = tiny_config("gpt2", 2, max_positions=128)
    cfg.vocab_size = len(tok)
    T.AutoModelForCausalLM.from_config(cfg).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    long = {"instruction": "Repeat.", "output": " ".join(["the answer is five"] * 120)}
    (root / "long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS + [long]))
    return root


def test_max_length_beyond_the_models_positions_is_one_line(tmp_path, assets, gpt2_128, capsys):
    cfg = write_config(tmp_path, assets, data={"path": str(gpt2_128 / "long.jsonl"), "max_length": 1024})
    line = assert_one_line(*cli(capsys, "train", cfg, "--set", f"model.source={gpt2_128 / 'model'}")[::2],
                           "data.max_length: 1024 tokens, but the model has 128 positions (n_positions in its config)")
    assert "set data.max_length <= 128" in line
    assert not (tmp_path / "run").exists()
    before = snapshot(tmp_path)
    assert_one_line(*cli(capsys, "eval", gpt2_128 / "model", "--format", "alpaca", "--data",
                         gpt2_128 / "long.jsonl", "--max-length", "1024")[::2],
                    "--max-length: 1024 tokens, but the model has 128 positions")
    assert snapshot(tmp_path) == before
    rc, out, err = cli(capsys, "eval", gpt2_128 / "model", "--format", "alpaca", "--data", gpt2_128 / "long.jsonl",
                       "--max-length", "128")  # within the positions: the long example is dropped, as always
    assert rc == 0, err


def test_a_rotary_model_beyond_its_positions_warns_in_one_line(caplog):
    from lisatune.analysis.tiny import tiny_model
    from lisatune.recipe.models import check_positions
    long = [{"input_ids": list(range(200))}]
    check_positions(tiny_model("llama", 2, max_positions=128), long, 256, "data.max_length")  # runs on: no error
    assert [r.getMessage() for r in caplog.records] == [
        "data.max_length: 256 tokens, but the model has 128 positions (max_position_embeddings in its config) and "
        "an example is 200 tokens long: positions beyond those it was trained on"]
    with pytest.raises(Exception, match="set data.max_length <= 128"):
        check_positions(tiny_model("gpt2", 2, max_positions=128), long, 256, "data.max_length")


# -- 7. an option given where it has no effect is refused (one validation step) -----------------------------------
@pytest.mark.parametrize("overrides,message", [
    (["data.split=test"], "data.split 'test': Unknown split \"test\". Should be one of ['train']."),
    (["data.val_split=test"], "data.val_split has no effect without data.val_path"),
    (["data.val_fraction=0", "data.val_path={assets}/train.jsonl", "data.val_split=dev"],
     "data.val_split 'dev': Unknown split \"dev\". Should be one of ['train']."),
    (["train.eval_limit=5"], "train.eval_limit has no effect without train.eval_tasks"),
])
def test_a_train_option_without_effect_is_refused(tmp_path, assets, capsys, overrides, message):
    cfg = write_config(tmp_path, assets)
    args = [a for o in overrides for a in ("--set", o.format(assets=assets))]
    assert_one_line(*cli(capsys, "train", cfg, *args)[::2], message.format(assets=assets) + "")
    assert not (tmp_path / "run").exists()


def test_a_gsm_split_and_a_saved_configs_defaults_are_told_apart(tmp_path, assets, capsys):
    from lisatune.recipe.config import TrainConfig, validate_config
    with pytest.raises(Exception, match="data.split has no effect with format gsm"):
        load_config(None, ["data.split=test"])
    # A saved config.yaml names every option, at its default: that is not "given where it has no effect".
    cfg = load_config(str(write_config(tmp_path, assets)), [])
    assert validate_config(cfg.model_dump(mode="json"), "config.yaml") == cfg
    assert isinstance(cfg, TrainConfig)


@pytest.mark.parametrize("args,message", [
    (["--format", "alpaca", "--data", "{assets}/train.jsonl", "--split", "test"],
     "--split 'test': Unknown split \"test\". Should be one of ['train']."),
    (["--tasks", "lisatune_gsm", "--split", "test"], "--split has no effect with --tasks"),
    (["--tasks", "lisatune_gsm", "--max-examples", "3"], "--max-examples has no effect with --tasks (--limit N"),
    (["--tasks", "lisatune_gsm", "--format", "gsm"], "--format has no effect with --tasks"),
    (["--tasks", "lisatune_gsm", "--max-length", "64"], "--max-length has no effect with --tasks"),
    (["--tasks", "lisatune_gsm", "--gsm-samples", "2"], "--gsm-samples has no effect with --tasks"),
    (["--format", "alpaca", "--data", "{assets}/train.jsonl", "--gsm-samples", "2"],
     "--gsm-samples has no effect with format alpaca"),
    (["--limit", "2"], "--limit has no effect without --tasks"),
    (["--columns", "instruction=q"], "--columns has no effect with format gsm"),
])
def test_an_eval_option_without_effect_is_refused(tmp_path, assets, capsys, args, message):
    before = snapshot(tmp_path)
    assert_one_line(*cli(capsys, "eval", assets / "model", *[a.format(assets=assets) for a in args])[::2],
                    message.format(assets=assets))
    assert snapshot(tmp_path) == before


# -- 8. smaller ones ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_generate_refuses_a_temperature_that_is_not_a_finite_number_ge_0(tmp_path, assets, capsys, value):
    before = snapshot(tmp_path)
    assert_one_line(*cli(capsys, "generate", assets / "model", "--prompt", "hi", f"--temperature={value}")[::2],
                    "--temperature must be a finite number >= 0")
    assert snapshot(tmp_path) == before


def test_any_exception_of_a_subcommand_is_one_line_and_its_traceback_is_under_debug(monkeypatch, capsys, cli_main):
    """The CLI's one boundary: an exception no layer turned into a LisaError (a library's, a bug) is still one
    line with exit 2; --log-level debug adds the traceback."""
    from lisatune.recipe import generate

    def boom(args):
        raise NotImplementedError("flex_attention is not supported on CPU\nmore detail")

    monkeypatch.setattr(generate, "register", lambda sub: sub.add_parser("generate").set_defaults(func=boom))
    assert cli_main(["generate"]) == 2
    err = capsys.readouterr().err
    assert err == ("lisatune generate: error: NotImplementedError: flex_attention is not supported on CPU "
                   "(the traceback: --log-level debug)\n")
    assert cli_main(["--log-level", "debug", "generate"]) == 2
    assert "Traceback (most recent call last)" in capsys.readouterr().err


# -- the fault guarantees on the new paths: killed after a checkpoint, resumed, bitwise the uninterrupted run --------
@pytest.mark.parametrize("sets", [["train.precision=bf16-mixed"], ["lisa.frozen_weights=nf4"],
                                  ["lisa.frozen_weights=nf4", "lisa.spill_dir=SPILL"],
                                  ["lisa.embed_head_state=8bit"], ["data.packing=true", "data.max_length=96"],
                                  ["data.format=chat", "data.path=CHAT"], ["lisa.activation_warmup=2"]],
                         ids=["bf16-mixed", "nf4", "nf4-spill", "8bit-eh", "packing", "conversations", "warmup"])
def test_a_run_killed_after_a_checkpoint_resumes_bitwise_on_each_new_path(tmp_path, assets, sets):
    from safetensors.torch import load_file
    from helpers import RECORDS
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": r["instruction"]},
                                                     {"role": "assistant", "content": r["output"]}]}) + "\n"
                            for r in RECORDS))
    sets = [s.replace("CHAT", str(chat)).replace("SPILL", str(tmp_path / "spill")) for s in sets]
    cfg = write_config(tmp_path, assets, save_every=2, keep_last=5, max_steps=6)
    run = tmp_path / "run"
    loop.train(load_config(str(cfg), sets))
    straight = load_file(str(run / "final" / "model.safetensors"))
    rows = (run / "metrics.jsonl").read_text()
    as_if_killed_before(run, 2)
    loop.train(load_config(str(cfg), [*sets, "train.resume=true"]))
    resumed = load_file(str(run / "final" / "model.safetensors"))
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    def losses(text):  # every row once, none lost or repeated (timings differ between the two runs)
        return [tuple(json.loads(r).get(k) for k in ("step", "loss", "eval_loss")) for r in text.splitlines()]
    assert losses((run / "metrics.jsonl").read_text()) == losses(rows)


def test_a_run_diverging_through_a_huge_embed_head_lr_names_it(tmp_path, assets, capsys):
    """#29: the embedding and head step at train.lr × lisa.embed_head_lr; when that multiplier is large, the
    divergence names it, not train.lr alone."""
    cfg = write_config(tmp_path, assets, lr=1e-3, max_grad_norm=None, max_steps=50)
    text = cfg.read_text().replace("n_layers: 2", "n_layers: 2\n  embed_head_lr: 1.0e+32")
    cfg.write_text(text)
    line = assert_one_line(*cli(capsys, "train", cfg)[::2], "non-finite")
    assert "× lisa.embed_head_lr=1e+32 for the embedding and head: lower lisa.embed_head_lr" in line, line


@pytest.mark.parametrize("model, message", [
    ("{tmp}/nope", "model.source '{tmp}/nope' does not exist"),
    ("tiny:0", "--model 'tiny:0': expected tiny or tiny:N_LAYERS with N_LAYERS >= 1"),
])
def test_bench_memory_reports_its_workers_bad_setting_as_one_line(tmp_path, capsys, model, message):
    """#29: the isolated worker's LisaError reaches the command line as its one line, not the worker's traceback."""
    model = model.format(tmp=tmp_path)
    rc, _, err = cli(capsys, "bench", "memory", "--model", model, "--methods", "lisa", "--out", tmp_path / "out")
    assert_one_line(rc, err, "lisatune: error: " + message.format(tmp=tmp_path))
    assert "Traceback" not in err


def test_an_output_folder_that_is_a_file_is_one_line_naming_it(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    rc, _, err = cli(capsys, "bench", "memory", "--model", "tiny", "--methods", "lisa", "--out", tmp_path / "afile" / "x")
    assert_one_line(rc, err, f"lisatune: error: --out '{tmp_path / 'afile' / 'x'}': '{tmp_path / 'afile'}' is a file, "
                             "not a directory")
