"""The benchmark harness's own logic, on real data: wrk output, /proc accounting, configs.

No timing is asserted; nginx and HAProxy only check the generated configurations.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import configs, procfs, report, wrk
from benchmarks.report import Cell, MemoryCell
from benchmarks.tls import make_pki

DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("name", ["wrk-1m-latency.txt", "wrk-close.txt", "wrk-404.txt"])
def test_wrk_exact_line_agrees_with_text_summary(name: str) -> None:
    output = (DATA / name).read_text()
    exact = wrk.parse_result_line(output)
    text = wrk.parse_text_summary(output)
    assert exact.requests == text.requests
    assert exact.errors == text.errors
    # the text summary rounds bytes to 3 digits and the duration to 10 ms
    assert text.bytes == pytest.approx(exact.bytes, rel=0.01)
    assert text.duration_s == pytest.approx(exact.duration_s, abs=0.01)
    assert text.p99_ms == pytest.approx(exact.p99_ms, rel=0.01)


def test_wrk_values_from_real_runs() -> None:
    big = wrk.parse_result_line((DATA / "wrk-1m-latency.txt").read_text())
    assert (big.requests, big.bytes, big.errors) == (930, 975892616, 0)
    assert big.bytes / big.requests > 1 << 20  # 1 MiB body plus headers
    assert big.mb_per_s == pytest.approx(975.892616 / 1.019621)
    assert big.p99_ms == 28.774
    not_found = wrk.parse_result_line((DATA / "wrk-404.txt").read_text())
    assert not_found.errors == not_found.requests == 139518
    assert not_found.error_kinds == "status=139518"


def test_wrk_without_result_line_is_an_error() -> None:
    with pytest.raises(ValueError, match="BENCH-RESULT"):
        wrk.parse_result_line("Running 1s test @ https://127.0.0.1:1/\nunable to connect")


def test_wrk_command_runs_in_private_namespace_with_hosts(tmp_path: Path) -> None:
    hosts = wrk.hosts_file(tmp_path / "hosts", ["app.bench.test"])
    assert "127.0.0.1 app.bench.test" in hosts.read_text().splitlines()
    cmd = wrk.wrk_command(
        "https://app.bench.test:1/small",
        script=tmp_path / "s.lua",
        hosts=hosts,
        duration_s=2.4,
        connections=50,
        close=True,
        cpus="1",
    )
    assert cmd[:2] == ["unshare", "--mount"]
    i = cmd.index("wrk")
    assert cmd[i - 3 : i] == ["taskset", "-c", "1"]
    assert ["-H", "Connection: close"] == cmd[cmd.index("-H") : cmd.index("-H") + 2]
    assert "-d2s" in cmd and "-c50" in cmd and cmd[-1] == "https://app.bench.test:1/small"


@pytest.mark.slow
def test_parse_stat_of_a_process_whose_name_has_spaces_and_parens(tmp_path: Path) -> None:
    odd = tmp_path / "a b) c"
    shutil.copy("/bin/sleep", odd)
    proc = subprocess.Popen([str(odd), "5"])
    try:
        st = procfs.parse_stat(Path(f"/proc/{proc.pid}/stat").read_text())
        assert (st.pid, st.ppid) == (proc.pid, os.getpid())
    finally:
        proc.kill()
        proc.wait()


BURN = """
import os, subprocess, sys, time
def burn(seconds):
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
if sys.argv[1] == "leader":
    # a worker in a NEW session: found through the parent link, not the process group
    child = subprocess.Popen([sys.executable, "-c", sys.argv[2], "worker", sys.argv[2]],
                             start_new_session=True)
    burn(0.3)
    print("done", flush=True)
    child.wait()
else:
    burn(0.3)
    print("done", flush=True)
    time.sleep(30)
"""


@pytest.mark.slow
def test_cpu_seconds_sums_the_whole_process_tree() -> None:
    leader = subprocess.Popen(
        [sys.executable, "-c", BURN, "leader", BURN],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert leader.stdout is not None
        assert leader.stdout.readline().strip() == "done"
        assert leader.stdout.readline().strip() == "done"
        pids = procfs.tree_pids(leader.pid)
        assert leader.pid in pids and len(pids) == 2
        # each burnt 0.3 s of CPU (plus interpreter start-up); ticks are 10 ms
        assert procfs.cpu_seconds(leader.pid) >= 0.55
    finally:
        for pid in procfs.tree_pids(leader.pid):
            os.kill(pid, 9)
        leader.wait()
        assert leader.stdout is not None
        leader.stdout.close()


def test_memory_reads_rss_and_pss_of_this_process() -> None:
    m = procfs.parse_smaps_rollup(Path("/proc/self/smaps_rollup").read_text())
    assert 0 < m.pss <= m.rss
    status = Path("/proc/self/status").read_text()
    vmrss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
    assert m.rss == pytest.approx(vmrss * 1024, rel=0.2)
    assert procfs.memory(os.getpid()).rss >= m.rss * 0.8


def test_cpu_busy_ticks_has_a_line_per_cpu() -> None:
    busy = procfs.cpu_busy_ticks()
    assert "cpu" in busy and f"cpu{(os.cpu_count() or 1) - 1}" in busy
    assert all(0 <= b <= t for b, t in busy.values())
    end = time.process_time() + 0.2
    while time.process_time() < end:
        pass
    fractions = procfs.busy_fractions(busy, procfs.cpu_busy_ticks())
    assert len(fractions) == os.cpu_count()
    assert all(0.0 <= f <= 1.0 for f in fractions) and sum(fractions) > 0


def _render(tmp_path: Path, tickets: bool) -> tuple[str, str, str]:
    pki = make_pki(tmp_path, "bench.test")
    names = configs.Names("bench.test", "app.bench.test", "pass.bench.test")
    origin = configs.OriginPorts(http=18080, tls=18443, tls_no_tickets=18444)
    module = Path("/usr/lib/nginx/modules/ngx_stream_module.so")
    nginx = configs.nginx_proxy(
        tmp_path,
        names=names,
        term_port=19443,
        pass_port=19444,
        origin=origin,
        cert=pki.proxy,
        stream_module=module,
        workers=1,
        tickets=tickets,
        nofile=20000,
    )
    haproxy = configs.haproxy(
        names=names,
        term_port=19445,
        pass_port=19446,
        origin=origin,
        cert=pki.proxy,
        workers=2,
        tickets=tickets,
        nofile=20000,
    )
    www = tmp_path / "www"
    www.mkdir()
    orig = configs.origin_nginx(tmp_path, origin, pki.origin, www, nofile=20000)
    return nginx, haproxy, orig


@pytest.mark.slow
@pytest.mark.parametrize("tickets", [True, False])
def test_generated_configs_are_accepted_by_nginx_and_haproxy(tmp_path: Path, tickets: bool) -> None:
    nginx, haproxy, origin = _render(tmp_path, tickets)
    assert ("ssl_session_tickets off;" in nginx) is not tickets
    assert ("no-tls-tickets" in haproxy) is not tickets
    assert "nbthread 2" in haproxy
    for name, text in (("proxy.conf", nginx), ("origin.conf", origin)):
        (tmp_path / name).write_text(text)
        check = subprocess.run(
            [
                "nginx",
                "-t",
                "-p",
                str(tmp_path),
                "-c",
                str(tmp_path / name),
                "-e",
                str(tmp_path / "err.log"),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert check.returncode == 0, check.stderr
    (tmp_path / "h.cfg").write_text(haproxy)
    check = subprocess.run(
        ["haproxy", "-c", "-f", str(tmp_path / "h.cfg")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    # no configuration warnings (e.g. rule order); limits-related ones depend on the host
    warnings = [line for line in (check.stdout + check.stderr).splitlines() if "WARNING" in line]
    assert not [w for w in warnings if "config :" in w or "parsing" in w], warnings


def _cell(server: str, scenario: str, rnd: int, requests: int, cpu: float, errors: int = 0) -> Cell:
    kinds = f"read={errors}" if errors else ""
    return Cell(
        server, scenario, rnd, requests, requests * 200, 5.0, errors, 10.0, cpu, error_kinds=kinds
    )


def test_ratios_medians_and_verdicts() -> None:
    cells = [
        _cell("nginx", "S1", 1, 100_000, 1.0),
        _cell("nginx", "S1", 2, 110_000, 1.1),
        _cell("nginx", "S1", 3, 90_000, 0.9),
        _cell("gateway", "S1", 1, 95_000, 1.9),
        _cell("gateway", "S1", 2, 85_000, 1.7),
        _cell("gateway", "S1", 3, 80_000, 1.6),
        _cell("nginx", "S2r", 1, 10_000, 3.0),
        _cell("gateway", "S2r", 1, 9_000, 3.0, errors=500),
    ]
    s = report.summarize(cells)
    assert s[("nginx", "S1")].throughput == 20_000  # median of 18k, 20k, 22k req/s
    assert s[("nginx", "S1")].spread == pytest.approx(0.2)
    assert s[("gateway", "S1")].cpu_per_unit == pytest.approx(20.0)  # 1.7 s / 85k requests
    mem = {
        "nginx": MemoryCell("nginx", 1, 10_000, 0, 150_000_000, 140_000_000),
        "gateway": MemoryCell("gateway", 1, 9_000, 1000, 200_000_000, 189_000_000),
    }
    v = {x.what: x for x in report.verdicts(s, mem)}
    assert v["S1 throughput"].ratio == pytest.approx(0.85) and v["S1 throughput"].ok is False
    assert v["S1 CPU per unit"].ratio == pytest.approx(2.0) and v["S1 CPU per unit"].ok is False
    assert v["S2r throughput"].ok is False and "errors" in v["S2r throughput"].target
    assert v["idle memory"].ratio == pytest.approx(1.5)  # per connection: 21 000 vs 14 000 B
    assert v["idle memory"].ok is True
    assert "S3 throughput" not in v  # not measured: no verdict
    md = report.markdown(
        s, report.summarize_memory(list(mem.values())), ["nginx", "gateway"], ["S1", "S2r"]
    )
    assert "| S1 CPU per unit | 2.00x | <= 1.5 | MISS |" in md
    assert "| idle memory | 1.50x | <= 1.5 | PASS |" in md
    assert "| 500 (read) |" in md  # the gateway's S2r row says which kind of error


def test_missing_gateway_is_pending_not_pass() -> None:
    s = report.summarize([_cell("nginx", "S4", 1, 1000, 0.5)])
    (thr, cpu) = report.verdicts(s, {})
    assert thr.ok is None and cpu.ok is None and math.isnan(thr.ratio)
    md = report.markdown(s, {}, ["nginx", "gateway"], ["S4"])
    assert "| gateway | pending |" in md and "PASS" not in md


@pytest.mark.slow
def test_idle_client_opens_and_holds_tls_connections(tmp_path: Path) -> None:
    """benchmarks.idle against a real TLS server: it reports READY and the count it holds."""
    import socket
    import ssl
    import threading

    pki = make_pki(tmp_path, "bench.test")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.proxy.cert, pki.proxy.key)
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    held: list[ssl.SSLSocket] = []

    def accept() -> None:
        for _ in range(5):
            conn, _ = server.accept()
            held.append(ctx.wrap_socket(conn, server_side=True))

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    client = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "benchmarks.idle",
            "--port",
            str(port),
            "--sni",
            "app.bench.test",
            "--count",
            "5",
            "--concurrency",
            "1",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert client.stdout is not None and client.stdin is not None
        assert client.stdout.readline().split() == ["READY", "5", "0"]
        thread.join(10)
        assert len(held) == 5 and all(s.version() == "TLSv1.3" for s in held)
        client.stdin.close()
        assert client.wait(timeout=10) == 0
        time.sleep(0.1)
        held[0].settimeout(2)
        assert held[0].recv(10) == b""  # the client closed without a request
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
        assert client.stdout is not None
        client.stdout.close()
        server.close()
        for s in held:
            s.close()


def test_gateway_config_routes_both_names_to_the_origin(tmp_path: Path) -> None:
    from benchmarks import gateway_cfg
    from gateway.config import parse_config
    from gateway.protocol.address import Mode, parse_address, split_sni

    origin = configs.OriginPorts(http=18080, tls=18443, tls_no_tickets=18444)
    names = gateway_cfg.names_for(origin)
    pki = make_pki(tmp_path, names.domain)
    certs = gateway_cfg.install_cert(tmp_path / "certs", pki.proxy)
    text = gateway_cfg.config_toml(
        data_dir=tmp_path / "d", certs_dir=certs, port=19000, workers=2, tickets=True
    )
    cfg = parse_config(text)
    assert cfg.proxy.workers == 2 and cfg.proxy.max_connections_per_app == 0
    assert cfg.proxy.session_tickets == 2
    no_tickets = gateway_cfg.config_toml(
        data_dir=tmp_path / "d", certs_dir=certs, port=19000, workers=1, tickets=False
    )
    assert parse_config(no_tickets).proxy.session_tickets == 0
    assert parse_config(text).proxy.splice_after >= 0  # the gateway's default: splice on
    no_splice = gateway_cfg.config_toml(
        data_dir=tmp_path / "d", certs_dir=certs, port=19000, workers=1, tickets=True, splice=False
    )
    assert parse_config(no_splice).proxy.splice_after == -1
    assert [r.app_id for r in cfg.proxy.routes] == [gateway_cfg.APP_ID]
    assert cfg.proxy.access_log is False  # no per-connection line, like nginx's access_log off
    assert (certs / names.domain / "fullchain.pem").read_bytes() == pki.proxy.cert.read_bytes()
    for host, port, mode in (
        (names.term_host, origin.http, Mode.TERMINATE),
        (names.pass_host, origin.tls, Mode.PASSTHROUGH),
    ):
        split = split_sni(host, frozenset(cfg.proxy.base_domains))
        assert split is not None
        addr = parse_address(split[0])
        assert (addr.id, addr.port, addr.mode) == (gateway_cfg.APP_ID, port, mode)


def test_profile_summary_of_a_real_pyspy_capture() -> None:
    from benchmarks.profile import parse_collapsed

    prof = parse_collapsed((DATA / "pyspy-S4-raw.txt").read_text())
    cats = dict(prof.categories)
    assert prof.samples + prof.idle == 596 and prof.idle > 0  # epoll waits counted apart
    assert sum(cats.values()) == prof.samples
    # a passthrough relay spends its time in send/recv: kernel copies, not Python
    assert cats["kernel, via syscalls"] > 0.8 * prof.samples
    assert prof.self_time[0][0] == "send [libc.so.6]"
    assert not any("run_worker" in name for name, _ in prof.inclusive)  # scaffolding dropped


def test_options_quick_mode_and_validation() -> None:
    from benchmarks.run import parse_args

    quick = parse_args(["--quick", "--scenarios", "S1,MEM", "--servers", "nginx,gateway"])
    assert (quick.duration, quick.warmup, quick.rounds, quick.memory_rounds) == (2.0, 0.0, 1, 1)
    assert quick.scenarios == ("S1",) and quick.memory and quick.memory_conns == 2000
    full = parse_args([])
    assert full.scenarios == ("S1", "S2r", "S2f", "S3", "S4", "S5") and full.memory
    assert (full.rounds, full.workers, full.pin) == (3, 1, True)
    for bad in (["--scenarios", "S9"], ["--servers", "haproxy,gateway"], ["--workers", "0"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
