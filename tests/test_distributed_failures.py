"""When ranks fail: a rank killed mid-generation, a rank that stops answering (a host that
cannot be reached), Ctrl-C on rank 0, an error on one rank, ranks that never come. Every
case ends every rank within 30 s, with one line from rank 0 (the others print nothing), and
--parallel misuse is one line too. Plus the server on two ranks."""

import json
import signal
import time
import urllib.request

import pytest
import ranks
from ranks import RANK_MAIN
from tiny_chat import tiny_checkpoint, tiny_hf_checkpoint
from typer.testing import CliRunner

from mlx_deepseek import cli as cli_app

LONG = ["-p", "Tell me a story", "-m", "5000", "--temp", "0"]


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def generating(n: int, tmp_path, kind="pipeline", env=None) -> ranks.Ranks:
    """n ranks in a long generation; returns once rank 0 has printed answer text."""
    model = tiny_checkpoint() if n == 2 else tiny_hf_checkpoint(num_hidden_layers=4)
    argv = [ranks.PYTHON, RANK_MAIN, "generate", str(model), *LONG, "--parallel", kind]
    r = ranks.start(argv, n, tmp_path, env=env)
    ranks.read_until(r.procs[0], "", timeout=600)  # any answer text: it is generating
    return r


def ended_within(r: ranks.Ranks, procs: list, limit: float) -> float:
    t0 = time.monotonic()
    for p in procs:
        p.wait(timeout=limit + 30)
    took = time.monotonic() - t0
    assert took < limit, f"the ranks took {took:.0f} s to end"
    return took


def test_a_rank_killed_mid_generation_ends_the_others(tmp_path):
    r = generating(2, tmp_path)
    r.procs[1].send_signal(signal.SIGKILL)
    took = ended_within(r, [r.procs[0]], 30)
    out = r.wait(10)
    rc, _, err = out[0]
    assert rc == 1
    report = [line for line in lines(err) if "parallel over" not in line]
    assert report == [
        "error: rank 1 (127.0.0.1) went away (its connection closed); ending every rank"
    ], err
    print(f"rank 0 ended {took:.1f} s after rank 1 was killed")


@pytest.mark.slow
def test_a_middle_rank_killed_ends_both_others(tmp_path):
    # ranks 0 and 2 may both wait on each other, not on rank 1's closed sockets: then the
    # heartbeats name it (the default 20 s of tests/ranks.py would leave little margin)
    r = generating(3, tmp_path, kind="tensor", env={"MLX_DEEPSEEK_PEER_TIMEOUT": "10"})
    r.procs[1].send_signal(signal.SIGKILL)
    took = ended_within(r, [r.procs[0], r.procs[2]], 30)
    print(f"ranks 0 and 2 ended {took:.1f} s after rank 1 was killed")
    out = r.wait(10)
    assert out[0][0] == 1 and out[2][0] != 0
    report = [line for line in lines(out[0][2]) if "parallel over" not in line]
    assert len(report) == 1 and report[0].startswith("error: rank 1 (127.0.0.1)"), out[0][2]
    assert out[2][1] == "" and out[2][2] == ""  # rank 2 says nothing: rank 0 reported


@pytest.mark.slow
def test_a_rank_that_stops_answering_ends_the_others(tmp_path):
    """SIGSTOP: the process is there, its sockets open, nothing answers (a frozen or
    unreachable host): MLX's collectives would wait for ever; the heartbeats do not."""
    r = generating(2, tmp_path, env={"MLX_DEEPSEEK_PEER_TIMEOUT": "8"})
    r.procs[1].send_signal(signal.SIGSTOP)
    try:
        took = ended_within(r, [r.procs[0]], 30)
        print(f"rank 0 ended {took:.1f} s after rank 1 stopped (peer timeout 8 s)")
    finally:
        r.procs[1].kill()
    rc, _, err = r.wait(10)[0]
    report = [line for line in lines(err) if "parallel over" not in line]
    assert rc == 1 and len(report) == 1, err
    assert report[0].startswith("error: rank 1 (127.0.0.1) stopped responding (no heartbeat")


@pytest.mark.slow
def test_ctrl_c_on_rank_0_stops_every_rank(tmp_path):
    r = generating(2, tmp_path)
    r.procs[0].send_signal(signal.SIGINT)
    took = ended_within(r, r.procs, 30)
    print(f"every rank ended {took:.1f} s after Ctrl-C on rank 0")
    (rc0, _, err0), (rc1, out1, err1) = r.wait(10)
    assert rc0 == 130 and lines(err0)[-1] == "interrupted", err0
    assert rc1 == 130 and out1 == err1 == ""


@pytest.mark.slow
def test_an_error_on_one_rank_is_reported_once_by_rank_0(tmp_path):
    argv = [ranks.PYTHON, RANK_MAIN, "generate", str(tiny_checkpoint()), "-p", "Hi", "-m", "3"]
    r = ranks.start([*argv, "--parallel", "tensor"], 2, tmp_path,
                    rank_envs={1: {"MLX_DEEPSEEK_BACKEND": "bogus"}})  # fmt: skip
    (rc0, out0, err0), (rc1, out1, err1) = r.wait(300)
    assert rc0 == 1 and rc1 == 1 and out0 == ""
    assert lines(err0) == [
        "error: rank 1 (127.0.0.1): MLX_DEEPSEEK_BACKEND='bogus': choose one of mlx, cpu, metal"
    ]
    assert out1 == err1 == ""


def test_ranks_that_never_come_end_with_one_line(tmp_path):
    argv = [ranks.PYTHON, RANK_MAIN, "generate", str(tiny_checkpoint()), "-p", "Hi"]
    env = {"MLX_DEEPSEEK_CONNECT_TIMEOUT": "5"}
    r = ranks.start([*argv, "--parallel", "pipeline"], 3, tmp_path, env=env, only=[0])
    (rc, out, err), = r.wait(120)  # fmt: skip
    assert rc == -signal.SIGTERM and out == ""  # ended by the watchdog (init holds the GIL)
    assert lines(err) == [
        "error: rank 0: could not reach every rank within 5 s (127.0.0.1, 127.0.0.1, "
        "127.0.0.1): check that each host is up and reachable on those ports and that "
        "mlx.launch started the command there (set MLX_DEEPSEEK_CONNECT_TIMEOUT to wait longer)"
    ]


def test_parallel_needs_mlx_launch_and_a_known_kind(monkeypatch):
    for var in ("MLX_HOSTFILE", "MLX_JACCL_COORDINATOR", "MLX_IBV_DEVICES", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    runner = CliRunner()
    model = str(tiny_checkpoint())
    r = runner.invoke(cli_app.app, ["generate", model, "-p", "Hi", "--parallel", "tensor"])
    assert r.exit_code == 1 and "--parallel needs several ranks: start every rank with" in str(
        r.exception
    )
    r = runner.invoke(cli_app.app, ["generate", model, "-p", "Hi", "--parallel", "ring"])
    assert r.exit_code == 2 and "'ring' is not one of" in r.output
    # auto in a process mlx.launch did not start: one process runs the model alone
    r = runner.invoke(cli_app.app, ["generate", model, "-p", "Hi", "-m", "3", "--parallel", "auto"])
    assert r.exit_code == 0 and r.stdout.strip()


# ---- the server ------------------------------------------------------------------------------


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=300) as f:
        return json.loads(f.read())


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["tensor", "pipeline"])
def test_serve_on_two_ranks_answers_as_one_process(kind, tmp_path):
    """Rank 0 serves HTTP; both ranks run each engine step (two requests batched, then one);
    Ctrl-C on rank 0 shuts every rank down."""
    from mlx_deepseek.loading import load
    from mlx_deepseek.serve.server import BackgroundServer, make_state

    model_dir = tiny_checkpoint()
    bodies = [
        {"prompt": "Hello there", "max_tokens": 8, "temperature": 0},
        {"prompt": "Tell me a story", "max_tokens": 5, "temperature": 0.9, "seed": 5},
    ]
    m, tok = load(model_dir)
    from mlx_deepseek.formats import chat_format

    state = make_state(m, tok, chat_format(tok, {}), "tiny")
    with BackgroundServer(state) as alone:
        want = [post(f"{alone.url}/v1/completions", b)["choices"][0]["text"] for b in bodies]
    port = ranks.free_ports(1)[0]
    argv = [ranks.PYTHON, RANK_MAIN, "serve", str(model_dir), "--port", str(port)]
    r = ranks.start([*argv, "--parallel", kind], 2, tmp_path)
    ranks.read_until(r.procs[0], "serving", timeout=600, stderr=True)
    url = f"http://127.0.0.1:{port}/v1/completions"
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda b: post(url, b)["choices"][0]["text"], bodies))
    assert got == want
    assert post(url, bodies[0])["choices"][0]["text"] == want[0]  # alone, after the batch
    r.procs[0].send_signal(signal.SIGINT)
    ended_within(r, r.procs, 30)
    (rc0, _, err0), (rc1, out1, err1) = r.wait(10)
    # uvicorn shuts down gracefully, then raises the Ctrl-C again (one process does the same)
    assert rc0 == 130 and lines(err0)[-1] == "interrupted", err0[-2000:]
    # rank 0's engine said stop (0), or rank 0's exit notice came first (its code): quietly
    assert rc1 in (0, 130) and out1 == err1 == ""
