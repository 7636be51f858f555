#!/usr/bin/env python3
"""Benchmarks of httpov, each a ratio against a baseline timed in the same run.

Absolute times drift on shared machines, so every measure compares httpov
with a baseline that runs right before or after it on the same machine:

    render         httpov render  vs  one POV-Ray process with all threads
    cycles         no-op workers' task cycles  vs  a bare http.server
    stitch         httpov.stitch_pngs  vs  ImageMagick convert -append
    upload-memory  server peak memory during a big upload  vs  before it
    claims         claim latency with a huge queue  vs  with 100 tasks,
                   plus the time to submit the huge job

    python3 benchmarks/run.py             every measure, full size
    python3 benchmarks/run.py --quick     every measure, reduced (< 1 min)
    python3 benchmarks/run.py --only stitch,claims --json results.json

Only the standard library is used, plus povray and ImageMagick's convert
for the baselines that need them; a measure whose tool is missing is
skipped. All traffic goes to 127.0.0.1, to servers that this script starts
and stops. Running as root, render workers use the user in $HTTPOV_USER,
or "nobody" when it is unset, because httpov does not render as root.
BENCHMARKS.md beside this file describes the measures and the latest run.
"""

import argparse
import http.client
import http.server
import io
import json
import os
import platform
import re
import shutil
import signal
import socket
import socketserver
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import httpov  # noqa: E402  (found through the sys.path line above)

HTTPOV = os.path.join(REPO, "httpov.py")
ANIMATION = os.path.join(REPO, "examples", "animation")
ALL_MEASURES = ("render", "cycles", "stitch", "upload-memory", "claims")
MIB = 1 << 20

SERVER_START_SECONDS = 30      # serve must print its port within this
SERVER_STOP_SECONDS = 10       # after SIGINT, then SIGKILL
SUBMIT_TIMEOUT_SECONDS = 120
RENDER_TIMEOUT_SECONDS = 600   # one render or POV-Ray run
CONVERT_TIMEOUT_SECONDS = 300

# Sizes of each measure: (full, quick).
SIZES = {
    "render_frames": (24, 8),
    "render_repeats": (2, 1),
    "cycle_workers": (256, 64),
    "cycle_seconds": (15.0, 5.0),
    "cycle_frames": (50000, 20000),
    "stitch_size": ((3840, 2160), (1920, 1080)),
    "stitch_slices": (32, 32),
    "stitch_repeats": (3, 1),
    "upload_mib": (1024, 128),
    "claim_tasks": (100000, 20000),
    "claim_small_tasks": (100, 100),
    "claim_samples": (300, 100),
}


class Skipped(Exception):
    """A measure cannot run here, for example because a tool is missing."""


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------

def make_row(name, value, unit, baseline, baseline_unit, ratio, goal,
             goal_of="ratio", details=None):
    """Build one result row and judge it against ``goal``.

    ``goal`` is (operator, limit), where the operator is "<=", ">=" or
    "<". It applies to the ratio, or to the value when ``goal_of`` is
    "value".
    """
    operator, limit = goal
    measured = ratio if goal_of == "ratio" else value
    checks = {"<=": measured <= limit, ">=": measured >= limit,
              "<": measured < limit}
    return {
        "name": name, "value": value, "unit": unit,
        "baseline": baseline, "baseline_unit": baseline_unit,
        "ratio": ratio, "goal": "%s %s %g" % (goal_of, operator, limit),
        "status": "PASS" if checks[operator] else "MISS",
        "details": details or {},
    }


def skipped_row(name, reason):
    return {"name": name, "value": None, "unit": "", "baseline": None,
            "baseline_unit": "", "ratio": None, "goal": "", "status": "SKIP",
            "details": {"reason": reason}}


def failed_row(name, reason):
    return {"name": name, "value": None, "unit": "", "baseline": None,
            "baseline_unit": "", "ratio": None, "goal": "",
            "status": "ERROR", "details": {"reason": reason}}


def format_number(value, unit):
    if value is None:
        return "-"
    if isinstance(value, float) and abs(value) < 10:
        text = "%.3f" % value
    elif isinstance(value, float) and abs(value) < 1000:
        text = "%.1f" % value
    else:
        text = "%.0f" % value
    return "%s %s" % (text, unit) if unit else text


def print_table(rows, stream=sys.stdout):
    header = ("measure", "value", "baseline", "ratio", "goal", "result")
    lines = [header]
    for row in rows:
        lines.append((
            row["name"],
            format_number(row["value"], row["unit"]),
            format_number(row["baseline"], row["baseline_unit"]),
            "-" if row["ratio"] is None else "%.3f" % row["ratio"],
            row["goal"] or "-",
            row["status"]))
    widths = [max(len(line[i]) for line in lines) for i in range(6)]
    for line in lines:
        stream.write("  ".join(cell.ljust(width) for cell, width
                               in zip(line, widths)).rstrip() + "\n")
    for row in rows:
        reason = row["details"].get("reason")
        if reason:
            stream.write("%s: %s\n" % (row["name"], reason))
    stream.flush()


def say(message):
    sys.stderr.write("[%s] %s\n" % (time.strftime("%H:%M:%S"), message))
    sys.stderr.flush()


# ---------------------------------------------------------------------------
# Processes: every one started here is tracked and stopped in a finally
# ---------------------------------------------------------------------------

def stop_process_group(process):
    """Stop a process started with start_new_session=True.

    SIGTERM comes first, because httpov render then stops its workers and
    their POV-Ray processes itself. Whatever is left of the group after
    SERVER_STOP_SECONDS gets SIGKILL.
    """
    for number in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, number)
        except ProcessLookupError:
            pass
        try:
            process.wait(SERVER_STOP_SECONDS)
            return
        except subprocess.TimeoutExpired:
            continue


def run_command(command, timeout, **options):
    """Run a command to its end and return (exit code, seconds, output).

    A command still running after ``timeout`` seconds is stopped with its
    process group, and the measure fails.
    """
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL,
                               start_new_session=True, **options)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_process_group(process)
        raise RuntimeError("%s timed out after %d s"
                           % (" ".join(command[:3]), timeout))
    finally:
        if process.poll() is None:
            stop_process_group(process)
    seconds = time.perf_counter() - started
    return process.returncode, seconds, output.decode("utf-8", "replace")


def stop_process(process, name):
    """Stop a server with SIGINT, as Ctrl-C would; kill it if it lingers."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(SERVER_STOP_SECONDS)
    except subprocess.TimeoutExpired:
        say("%s (pid %d) ignored SIGINT for %d s; killing it"
            % (name, process.pid, SERVER_STOP_SECONDS))
        process.kill()
        process.wait()


class ServeProcess:
    """An ``httpov.py serve`` subprocess on a free loopback port.

    Use it as a context manager: leaving the block stops the server with
    SIGINT (its clean shutdown), and with SIGKILL if it is still running
    SERVER_STOP_SECONDS later.
    """

    def __init__(self, folder, extra_options=()):
        self.folder = folder
        self.data = os.path.join(folder, "data")
        self.stdout_path = os.path.join(folder, "serve.out")
        self.log_path = os.path.join(folder, "serve.log")
        self.extra_options = list(extra_options)
        self.process = None

    def __enter__(self):
        os.makedirs(self.folder, exist_ok=True)
        with open(self.stdout_path, "wb") as stdout, \
                open(self.log_path, "wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, HTTPOV, "serve", "--bind", "127.0.0.1",
                 "--port", "0", "--data", self.data] + self.extra_options,
                stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL)
        try:
            self.port = self.wait_for_port()
            with open(os.path.join(self.data, "tokens.json")) as source:
                self.tokens = json.load(source)
        except BaseException:
            self.stop()
            raise
        self.url = "http://127.0.0.1:%d/" % self.port
        return self

    def __exit__(self, kind, value, traceback_):
        self.stop()
        return False

    def wait_for_port(self):
        deadline = time.monotonic() + SERVER_START_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("serve exited with status %d: %s"
                                   % (self.process.returncode,
                                      self.log_tail()))
            with open(self.stdout_path, errors="replace") as source:
                match = re.search(r" port (\d+)\s*$", source.readline())
            if match:
                return int(match.group(1))
            time.sleep(0.05)
        raise RuntimeError("serve printed no port within %d s: %s"
                           % (SERVER_START_SECONDS, self.log_tail()))

    def log_tail(self, lines=5):
        try:
            with open(self.log_path, errors="replace") as source:
                return " | ".join(source.read().splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self):
        stop_process(self.process, "serve")

    def memory_kib(self, field):
        """Return VmRSS or VmHWM of the server process, in KiB."""
        with open("/proc/%d/status" % self.process.pid) as source:
            for line in source:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise RuntimeError("/proc/%d/status has no %s line"
                           % (self.process.pid, field))

    def cpu_seconds(self):
        """Return the user plus system CPU time of the server process."""
        with open("/proc/%d/stat" % self.process.pid) as source:
            fields = source.read().rsplit(")", 1)[1].split()
        # Fields 14 and 15 of proc(5), utime and stime, counted from the
        # state field (3) after the command name.
        ticks = int(fields[11]) + int(fields[12])
        return ticks / float(os.sysconf("SC_CLK_TCK"))

    def client(self, role="worker"):
        return httpov.ApiClient(self.url, self.tokens[role])

    def submit(self, frames, extra_options=(), povray_options=()):
        """Submit the animation example with the CLI.

        Returns the job id and the seconds the submit command took.

        The frames are 8x8 pixels, so that a result upload is small.
        """
        command = ([sys.executable, HTTPOV, "submit", self.url, ANIMATION,
                    "--token", self.tokens["admin"]] + list(extra_options) +
                   ["--", "+W8", "+H8", "+KFF%d" % frames] +
                   list(povray_options))
        code, seconds, output = run_command(command, SUBMIT_TIMEOUT_SECONDS,
                                            cwd=self.folder)
        if code != 0:
            raise RuntimeError("submit exited with status %d: %s"
                               % (code, output.strip()[-500:]))
        job = int(output.strip().splitlines()[-1])
        return job, seconds


def tool_path(name):
    path = shutil.which(name)
    if path is None:
        raise Skipped("%s is not installed (on Debian: apt-get install %s)"
                      % (name, {"convert": "imagemagick"}.get(name, name)))
    return path


def render_user():
    """Return the --user for httpov render, or None when not root."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return os.environ.get("HTTPOV_USER") or "nobody"
    return os.environ.get("HTTPOV_USER") or None


# ---------------------------------------------------------------------------
# 1. render: httpov render vs one POV-Ray process
# ---------------------------------------------------------------------------

def measure_render(quick, scratch):
    """Time httpov render of the animation example against POV-Ray alone.

    The baseline renders the same frames in one POV-Ray process with one
    thread per core. Each repeat runs the baseline, then httpov, and the
    minimum of each is compared.
    """
    povray = tool_path("povray")
    frames = SIZES["render_frames"][quick]
    repeats = SIZES["render_repeats"][quick]
    cores = os.cpu_count() or 1
    user = render_user()
    httpov_times, povray_times = [], []
    for repeat in range(repeats):
        folder = os.path.join(scratch, "render-%d" % repeat)
        os.makedirs(folder)
        os.chmod(folder, 0o755)

        out = os.path.join(folder, "povray")
        os.makedirs(out)
        command = [povray, "-D", "+WT%d" % cores, "animation.ini", "+SF1",
                   "+EF%d" % frames, "+O" + os.path.join(out, "f")]
        code, seconds, output = run_command(
            command, RENDER_TIMEOUT_SECONDS, cwd=ANIMATION)
        written = [name for name in os.listdir(out) if name.endswith(".png")]
        if code != 0 or len(written) != frames:
            raise RuntimeError("povray exited with status %d and wrote %d "
                               "of %d frames: %s" % (code, len(written),
                                                     frames, output[-500:]))
        povray_times.append(seconds)
        say("render: povray, %d frames: %.2f s" % (frames, seconds))

        out = os.path.join(folder, "httpov")
        command = [sys.executable, HTTPOV, "render", ANIMATION, "-o", out]
        if frames != 24:
            command += ["--frames", "1-%d" % frames]
        if user:
            command += ["--user", user]
        # httpov render makes its temporary folder under TMPDIR; the
        # render user must be able to enter it, hence the 0755 folder.
        environment = dict(os.environ, TMPDIR=folder)
        code, seconds, output = run_command(
            command, RENDER_TIMEOUT_SECONDS, cwd=folder, env=environment)
        written = [name for name in os.listdir(out) if name.endswith(".png")] \
            if os.path.isdir(out) else []
        if code != 0 or len(written) != frames:
            raise RuntimeError("httpov render exited with status %d and "
                               "wrote %d of %d frames: %s"
                               % (code, len(written), frames,
                                  output.strip()[-500:]))
        httpov_times.append(seconds)
        say("render: httpov, %d frames: %.2f s" % (frames, seconds))
        shutil.rmtree(folder, ignore_errors=True)

    value, baseline = min(httpov_times), min(povray_times)
    return [make_row(
        "render", value, "s", baseline, "s", value / baseline, ("<=", 1.0),
        details={"frames": frames, "repeats": repeats, "threads": cores,
                 "render_user": user, "httpov_seconds": httpov_times,
                 "povray_seconds": povray_times,
                 "statistic": "minimum of the repeats"})]


# ---------------------------------------------------------------------------
# 2. cycles: simulated workers vs a bare http.server
# ---------------------------------------------------------------------------

class BareHandler(http.server.BaseHTTPRequestHandler):
    """A request handler that reads the body and returns a small JSON
    object, keeping the connection alive."""

    protocol_version = "HTTP/1.1"
    body = b'{"status": "ok"}\n'
    # Without TCP_NODELAY the body, written after the headers, waits for
    # the client's delayed ACK of the headers (about 40 ms on Linux).
    disable_nagle_algorithm = True

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        while length > 0:
            chunk = self.rfile.read(min(length, MIB))
            if not chunk:
                return
            length -= len(chunk)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format, *args):
        pass


class BareServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128    # the same backlog as httpov's server


def serve_bare(port_file):
    """Serve BareHandler on a free loopback port until SIGINT or SIGTERM.

    This runs in its own process (run.py --serve-bare FILE), so that the
    baseline server, like httpov's, does not share the clients' GIL.
    """
    server = BareServer(("127.0.0.1", 0), BareHandler)
    signal.signal(signal.SIGTERM, lambda number, frame: sys.exit(0))
    with open(port_file + ".tmp", "w") as target:
        target.write(str(server.server_address[1]))
    os.replace(port_file + ".tmp", port_file)
    try:
        server.serve_forever()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        server.server_close()
    return 0


class BareProcess:
    """A ``run.py --serve-bare`` subprocess, stopped when the block ends."""

    def __init__(self, folder):
        self.port_file = os.path.join(folder, "bare-port")
        self.process = None

    def __enter__(self):
        self.process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--serve-bare",
             self.port_file], stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + SERVER_START_SECONDS
        while not os.path.exists(self.port_file):
            if self.process.poll() is not None or \
                    time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the bare HTTP server did not start")
            time.sleep(0.05)
        with open(self.port_file) as source:
            self.url = "http://127.0.0.1:%d/" % int(source.read())
        return self

    def __exit__(self, kind, value, traceback_):
        self.stop()
        return False

    def stop(self):
        stop_process(self.process, "the bare server")


def tiny_png_bytes(width, height, folder):
    """Return the bytes of a valid RGB PNG of the given size."""
    path = os.path.join(folder, "tiny-%dx%d.png" % (width, height))
    info = httpov.ImageInfo(width, height, 8, 2)
    row = bytes(range(3 * width)) if 3 * width <= 256 else bytes(3 * width)
    httpov.write_png(path, info, ((0, row) for _ in range(height)))
    with open(path, "rb") as source:
        return source.read()


def result_zip(task, png):
    """Return a result archive as Worker.pack_result writes it."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for frame in range(task["frame_first"], task["frame_last"] + 1):
            archive.writestr("frames/%d.png" % frame, png)
        archive.writestr("log.txt", "no-op renderer\n",
                         zipfile.ZIP_DEFLATED)
    return buffer.getvalue()


class CycleCounter:
    """Shared tallies of the simulated workers, guarded by a lock."""

    def __init__(self):
        self.lock = threading.Lock()
        self.cycles = 0
        self.frames = 0
        self.errors = {}
        self.ran_dry = 0

    def add(self, cycles=0, frames=0, error=None, ran_dry=0):
        with self.lock:
            self.cycles += cycles
            self.frames += frames
            self.ran_dry += ran_dry
            if error is not None:
                self.errors[error] = self.errors.get(error, 0) + 1


def call_then_wait(client, path, body, start, counter, label):
    """POST once to connect, then wait at the ``start`` barrier.

    Returns the response, or None when the call failed (which breaks the
    barrier for every thread) or the barrier was broken.
    """
    try:
        answer = client.call("POST", path, body)
    except (httpov.ApiError, httpov.ServerUnreachable) as error:
        counter.add(error="%s: %s" % (label, error))
        start.abort()
        return None
    try:
        start.wait(SERVER_START_SECONDS)
    except threading.BrokenBarrierError:
        return None
    return answer


def farm_worker(url, token, png_cache, folder, start, window, counter):
    """Register, then claim, heartbeat and upload a result until the end.

    ``window`` is [start time, end time] on time.monotonic(), set by the
    main thread once every worker has passed the ``start`` barrier.
    """
    client = httpov.ApiClient(url, token)
    answer = call_then_wait(client, "/api/workers", {"name": "bench"},
                            start, counter, "register")
    if answer is None:
        return
    worker = answer["worker"]
    try:
        while time.monotonic() < window[1]:
            try:
                task = client.call("POST", "/api/claim",
                                   {"worker": worker})["task"]
                if task is None:
                    counter.add(ran_dry=1)
                    return
                client.call("POST", "/api/tasks/%d/heartbeat" % task["id"],
                            {"attempt": task["attempt"], "worker": worker,
                             "progress": 0.5})
                size = (task["settings"]["width"],
                        task["settings"]["height"])
                if size not in png_cache:
                    png_cache[size] = tiny_png_bytes(size[0], size[1],
                                                     folder)
                client.request(
                    "POST", "/api/tasks/%d/result?attempt=%s"
                    % (task["id"], task["attempt"]),
                    result_zip(task, png_cache[size]), "application/zip")
            except (httpov.ApiError, httpov.ServerUnreachable) as error:
                counter.add(error=str(error)[:120])
                time.sleep(0.1)
                continue
            if time.monotonic() <= window[1]:
                counter.add(cycles=1, frames=task["frame_last"] -
                            task["frame_first"] + 1)
    finally:
        client.close()


def bare_worker(url, token, body, start, window, counter):
    """Send the same three requests as farm_worker to the bare server."""
    client = httpov.ApiClient(url, token)
    claim = {"worker": 1}
    heartbeat = {"attempt": "0" * 32, "worker": 1, "progress": 0.5}
    if call_then_wait(client, "/warm-up", claim, start, counter,
                      "connect") is None:
        return
    try:
        while time.monotonic() < window[1]:
            try:
                client.call("POST", "/api/claim", claim)
                client.call("POST", "/api/tasks/1/heartbeat", heartbeat)
                client.request("POST", "/api/tasks/1/result?attempt=x",
                               body, "application/zip")
            except (httpov.ApiError, httpov.ServerUnreachable) as error:
                counter.add(error=str(error)[:120])
                time.sleep(0.1)
                continue
            if time.monotonic() <= window[1]:
                counter.add(cycles=1)
    finally:
        client.close()


def drive_workers(target, arguments, count, seconds):
    """Start ``count`` threads of ``target`` and time a window of them.

    Returns (counter, CPU cores this process kept busy). Threads set up
    first (register or connect), then all start together at a barrier.
    """
    counter = CycleCounter()
    window = [0.0, time.monotonic() + SERVER_START_SECONDS + seconds]

    window_cpu = [0.0]

    def open_window():
        times = os.times()
        window_cpu[0] = times.user + times.system
        window[0] = time.monotonic()
        window[1] = window[0] + seconds

    # The barrier's action runs once all threads arrived, before any of
    # them is released, so every thread reads the final window.
    start = threading.Barrier(count + 1, action=open_window)
    threads = [threading.Thread(target=target, daemon=True,
                                args=arguments + (start, window, counter))
               for _ in range(count)]
    for thread in threads:
        thread.start()
    try:
        start.wait(SERVER_START_SECONDS)
    except threading.BrokenBarrierError:
        window[1] = 0.0
        raise RuntimeError("simulated workers could not start: %s"
                           % counter.errors)
    for thread in threads:
        thread.join(max(0.0, window[1] - time.monotonic()) + 60)
    alive = sum(thread.is_alive() for thread in threads)
    if alive:
        raise RuntimeError("%d simulated workers still running 60 s after "
                           "the end of the window" % alive)
    ended = os.times()
    busy = (ended.user + ended.system - window_cpu[0]) / \
        (time.monotonic() - window[0])
    return counter, busy


def measure_cycles(quick, scratch):
    """Count task cycles per second of simulated no-op workers.

    A cycle is claim, heartbeat and result upload (3 requests). The
    baseline is the same three requests per cycle, from the same number
    of threads, against BareServer in a process of its own.
    """
    workers = SIZES["cycle_workers"][quick]
    seconds = SIZES["cycle_seconds"][quick]
    frames = SIZES["cycle_frames"][quick]
    folder = os.path.join(scratch, "cycles")
    os.makedirs(folder)
    png_cache = {(8, 8): tiny_png_bytes(8, 8, folder)}

    with BareProcess(folder) as bare:
        body = result_zip({"frame_first": 1, "frame_last": 1},
                          png_cache[(8, 8)])
        counter, bare_client_cpu = drive_workers(
            bare_worker, (bare.url, "x", body), workers, seconds)
    bare_requests = 3 * counter.cycles / seconds
    bare_errors = counter.errors
    say("cycles: bare http.server, %d threads: %.0f requests/s"
        % (workers, bare_requests))

    # Every simulated worker connects from 127.0.0.1.
    with ServeProcess(os.path.join(folder, "serve"),
                      ["--max-address-connections",
                       str(2 * workers)]) as server:
        job, _ = server.submit(frames, ["--frames-per-task", "1"])
        cpu_before, wall_before = server.cpu_seconds(), time.monotonic()
        counter, client_cpu = drive_workers(
            farm_worker, (server.url, server.tokens["worker"], png_cache,
                          folder), workers, seconds)
        server_cpu = (server.cpu_seconds() - cpu_before) / \
            (time.monotonic() - wall_before)
        admin = server.client("admin")
        status = admin.call("GET", "/api/jobs/%d" % job)
        admin.close()
    cycles = counter.cycles / seconds
    say("cycles: httpov serve, %d workers: %.1f cycles/s"
        % (workers, cycles))
    details = {"workers": workers, "seconds": seconds, "job_frames": frames,
               "bare_requests_per_second": bare_requests,
               "frames_per_second": counter.frames / seconds,
               "server_cpu_cores_busy": round(server_cpu, 2),
               "client_cpu_cores_busy": round(client_cpu, 2),
               "bare_client_cpu_cores_busy": round(bare_client_cpu, 2),
               "tasks_done_on_server": status.get("tasks_done"),
               "errors": counter.errors, "bare_errors": bare_errors,
               "workers_that_ran_out_of_tasks": counter.ran_dry}
    if counter.ran_dry:
        details["reason"] = ("the job ran out of tasks before the end of "
                             "the window; the rate is too low")
    baseline = bare_requests / 3
    return [make_row("cycles", cycles, "cycles/s", baseline, "cycles/s",
                     cycles / baseline, (">=", 0.8), details=details)]


# ---------------------------------------------------------------------------
# 3. stitch: httpov.stitch_pngs vs convert -append
# ---------------------------------------------------------------------------

def noisy_gradient_rows(width, height, seed=1):
    """Return the rows of an 8-bit RGB test image: a gradient with noise.

    Red rises and blue falls from left to right, green rises from top to
    bottom, and the low 4 bits of every sample are random, so the image
    neither compresses to nothing nor is pure noise. Python integers do
    the per-byte work a row at a time: the red/blue and green parts never
    share a byte, so adding them has no carries, and XOR has none either.
    """
    import random
    generator = random.Random(seed)
    row_bytes = 3 * width
    horizontal = bytearray(row_bytes)
    for x in range(width):
        red = x * 255 // max(width - 1, 1)
        horizontal[3 * x] = red
        horizontal[3 * x + 2] = 255 - red
    horizontal = int.from_bytes(horizontal, "big")
    green_unit = int.from_bytes(b"\0\1\0" * width, "big")
    low_bits = bytes(value & 15 for value in range(256))
    rows = []
    for y in range(height):
        green = y * 255 // max(height - 1, 1)
        noise = generator.getrandbits(8 * row_bytes).to_bytes(
            row_bytes, "big").translate(low_bits)
        value = (horizontal + green * green_unit) ^ \
            int.from_bytes(noise, "big")
        rows.append(value.to_bytes(row_bytes, "big"))
    return rows


def write_slices(folder, rows, width, count):
    """Write ``count`` slice PNGs of consecutive rows; return their paths."""
    height = len(rows)
    bounds = [height * number // count for number in range(count + 1)]
    paths = []
    for number in range(count):
        part = rows[bounds[number]:bounds[number + 1]]
        path = os.path.join(folder, "slice%02d.png" % number)
        httpov.write_png(path, httpov.ImageInfo(width, len(part), 8, 2),
                         ((0, row) for row in part))
        paths.append(path)
    return paths


def compare_pixels(rows, first_path, second_path):
    """Return None if both PNGs decode to ``rows``, else the difference."""
    first = httpov.iter_png_rows(first_path)
    second = httpov.iter_png_rows(second_path)
    first_info, _ = next(first)
    second_info, _ = next(second)
    if first_info != second_info:
        return "headers differ: %s vs %s" % (first_info.describe(),
                                             second_info.describe())
    for number, (expected, one, other) in enumerate(
            zip(rows, first, second), 1):
        if one != expected or other != expected:
            return "row %d differs (%s)" % (
                number, "httpov" if one != expected else "convert")
    return None


def measure_stitch(quick, scratch):
    """Time httpov.stitch_pngs against convert -append on the same slices.

    Both outputs are decoded with httpov.iter_png_rows afterwards and must
    contain exactly the rows of the test image.
    """
    convert = tool_path("convert")
    version = first_line_of([convert, "-version"]) or ""
    if "ImageMagick" not in version:
        raise Skipped("%s is not ImageMagick's convert (its -version "
                      "prints %r)" % (convert, version[:80]))
    width, height = SIZES["stitch_size"][quick]
    count = SIZES["stitch_slices"][quick]
    repeats = SIZES["stitch_repeats"][quick]
    folder = os.path.join(scratch, "stitch")
    os.makedirs(folder)
    rows = noisy_gradient_rows(width, height)
    paths = write_slices(folder, rows, width, count)
    httpov_target = os.path.join(folder, "httpov.png")
    convert_target = os.path.join(folder, "convert.png")
    httpov_times, convert_times = [], []
    for _ in range(repeats):
        # PNG24: makes ImageMagick write 8-bit RGB like its input instead
        # of choosing a format by itself.
        code, seconds, output = run_command(
            [convert] + paths + ["-append", "PNG24:" + convert_target],
            CONVERT_TIMEOUT_SECONDS)
        if code != 0:
            raise RuntimeError("convert exited with status %d: %s"
                               % (code, output[-500:]))
        convert_times.append(seconds)
        started = time.perf_counter()
        httpov.stitch_pngs(httpov_target, paths, width, height)
        httpov_times.append(time.perf_counter() - started)
    say("stitch: %dx%d from %d slices: httpov %.3f s, convert %.3f s"
        % (width, height, count, min(httpov_times), min(convert_times)))
    started = time.perf_counter()
    difference = compare_pixels(rows, httpov_target, convert_target)
    check_seconds = time.perf_counter() - started
    if difference:
        raise RuntimeError("stitched images differ: %s" % difference)
    value, baseline = min(httpov_times), min(convert_times)
    return [make_row(
        "stitch", value, "s", baseline, "s", value / baseline, ("<=", 1.0),
        details={"width": width, "height": height, "slices": count,
                 "repeats": repeats, "httpov_seconds": httpov_times,
                 "convert_seconds": convert_times,
                 "statistic": "minimum of the repeats",
                 "pixels_identical": True,
                 "pixel_check_seconds": check_seconds,
                 "httpov_bytes": os.path.getsize(httpov_target),
                 "convert_bytes": os.path.getsize(convert_target)})]


# ---------------------------------------------------------------------------
# 4. upload-memory: server memory while a big result streams in
# ---------------------------------------------------------------------------

def stream_zeros(port, path, token, size):
    """POST ``size`` zero bytes in 1 MiB sends and return (status, body)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        connection.putrequest("POST", path)
        connection.putheader("Authorization", "Bearer %s" % token)
        connection.putheader("Content-Type", "application/zip")
        connection.putheader("Content-Length", str(size))
        connection.endheaders()
        piece = bytes(MIB)
        left = size
        while left:
            connection.send(piece[:min(left, MIB)])
            left -= min(left, MIB)
        response = connection.getresponse()
        return response.status, response.read()[:300]
    finally:
        connection.close()


def measure_upload_memory(quick, scratch):
    """Compare the server's peak memory after a big upload with its RSS
    before it.

    The body is zeros, not a zip file, so the server rejects it with 400
    after it has read the whole body to disk, which is all that matters
    for memory.
    """
    size = SIZES["upload_mib"][quick] * MIB
    folder = os.path.join(scratch, "upload")
    with ServeProcess(folder, ["--max-result-mib", "2048"]) as server:
        server.submit(4)
        client = server.client()
        worker = client.call("POST", "/api/workers", {"name": "bench"})
        task = client.call("POST", "/api/claim",
                           {"worker": worker["worker"]})["task"]
        if task is None:
            raise RuntimeError("the claim returned no task")
        client.close()
        before = server.memory_kib("VmRSS")
        peak_before = server.memory_kib("VmHWM")
        started = time.perf_counter()
        status, body = stream_zeros(
            server.port, "/api/tasks/%d/result?attempt=%s"
            % (task["id"], task["attempt"]), server.tokens["worker"], size)
        seconds = time.perf_counter() - started
        peak = server.memory_kib("VmHWM")
    say("upload-memory: %d MiB in %.1f s, status %d; VmRSS before %d KiB, "
        "VmHWM after %d KiB" % (size >> 20, seconds, status, before, peak))
    if status >= 500:
        raise RuntimeError("the upload got status %d: %r" % (status, body))
    return [make_row(
        "upload-memory", peak / 1024.0, "MiB", before / 1024.0, "MiB",
        peak / float(before), ("<=", 1.2),
        details={"upload_mib": size >> 20, "status": status,
                 "response": body.decode("utf-8", "replace"),
                 "upload_seconds": seconds,
                 "vmhwm_before_upload_kib": peak_before})]


# ---------------------------------------------------------------------------
# 5. claims: claim latency with a huge queue vs a small one
# ---------------------------------------------------------------------------

def acknowledge_now(connection):
    """Make Linux send the pending ACK of what the socket received.

    httpov's server writes a response's headers and body in two sends
    without TCP_NODELAY, so the body waits for the client's delayed ACK of
    the headers, about 40 ms. Acknowledging at once keeps that wait out of
    the benchmark's run time; the latencies measured stop at the headers
    and do not depend on it.
    """
    option = getattr(socket, "TCP_QUICKACK", None)
    if option is not None and connection.sock is not None:
        connection.sock.setsockopt(socket.IPPROTO_TCP, option, 1)


def post_json(connection, path, token, value):
    """POST a JSON object and return (reply, seconds to the headers).

    The time runs from sending the request to receiving the response
    headers, which the server sends only after it has done the work.
    """
    body = json.dumps(value).encode()
    headers = {"Authorization": "Bearer %s" % token,
               "Content-Type": "application/json",
               "Content-Length": str(len(body))}
    started = time.perf_counter()
    connection.request("POST", path, body, headers)
    response = connection.getresponse()
    seconds = time.perf_counter() - started
    acknowledge_now(connection)
    data = response.read()
    if response.status >= 300:
        raise RuntimeError("POST %s returned status %d: %s"
                           % (path, response.status, data[:300]))
    return json.loads(data.decode()), seconds


class ClaimProbe:
    """A prober that claims and releases tasks of one server over a
    kept-alive connection.

    Use it as a context manager, which registers a worker on entry and
    closes the connection on exit.
    """

    def __init__(self, server):
        self.token = server.tokens["worker"]
        self.connection = http.client.HTTPConnection(
            "127.0.0.1", server.port, timeout=60)
        self.worker = None

    def __enter__(self):
        self.worker = post_json(self.connection, "/api/workers", self.token,
                                {"name": "bench"})[0]["worker"]
        return self

    def __exit__(self, kind, value, traceback_):
        self.connection.close()
        return False

    def sample(self):
        """Claim a task, release it and return the claim's latency."""
        reply, seconds = post_json(self.connection, "/api/claim",
                                   self.token, {"worker": self.worker})
        task = reply["task"]
        if task is None:
            raise RuntimeError("the claim returned no task")
        post_json(self.connection, "/api/tasks/%d/release" % task["id"],
                  self.token, {"attempt": task["attempt"]})
        return seconds


def worker_claim_latencies(server, samples):
    """Time whole claim round trips made with httpov.ApiClient."""
    client = server.client()
    try:
        worker = client.call("POST", "/api/workers",
                             {"name": "bench"})["worker"]
        latencies = []
        for _ in range(samples):
            started = time.perf_counter()
            task = client.call("POST", "/api/claim",
                               {"worker": worker})["task"]
            latencies.append(time.perf_counter() - started)
            client.call("POST", "/api/tasks/%d/release" % task["id"],
                        {"attempt": task["attempt"]})
        return latencies
    finally:
        client.close()


def measure_claims(quick, scratch):
    """Compare the median claim latency of a huge queue and a small one.

    Also times ``httpov.py submit`` of the huge job. Each claimed task is
    released at once, so the queue stays full.
    """
    big = SIZES["claim_tasks"][quick]
    small = SIZES["claim_small_tasks"][quick]
    samples = SIZES["claim_samples"][quick]
    small_server = ServeProcess(os.path.join(scratch, "claims-small"))
    big_server = ServeProcess(os.path.join(scratch, "claims-big"))
    # Both servers run at once and their samples alternate, so that a
    # change in the machine's load affects both alike.
    with small_server, big_server:
        small_server.submit(small)
        _, submit_seconds = big_server.submit(big)
        small_latencies, big_latencies = [], []
        with ClaimProbe(small_server) as small_probe, \
                ClaimProbe(big_server) as big_probe:
            for number in range(5 + samples):
                small_seconds = small_probe.sample()
                big_seconds = big_probe.sample()
                if number >= 5:     # the first claims warm up caches
                    small_latencies.append(small_seconds)
                    big_latencies.append(big_seconds)
        round_trips = worker_claim_latencies(big_server, 10)
    value = statistics.median(big_latencies) * 1000
    baseline = statistics.median(small_latencies) * 1000
    say("claims: median %.2f ms with %d tasks, %.2f ms with %d; submit "
        "%.2f s" % (value, big, baseline, small, submit_seconds))
    return [
        make_row("claims", value, "ms", baseline, "ms", value / baseline,
                 ("<=", 1.2),
                 details={"queued_tasks": big, "baseline_tasks": small,
                          "samples": samples,
                          "statistic": "median time to the response "
                          "headers",
                          "api_client_round_trip_ms": statistics.median(
                              round_trips) * 1000,
                          "p90_ms": sorted(big_latencies)[
                              int(0.9 * samples)] * 1000,
                          "baseline_p90_ms": sorted(small_latencies)[
                              int(0.9 * samples)] * 1000}),
        make_row("claims-submit", submit_seconds, "s", None, "", None,
                 ("<", 2.0), goal_of="value",
                 details={"tasks": big, "command": "httpov.py submit "
                          "examples/animation -- +W8 +H8 +KFF%d" % big}),
    ]


# ---------------------------------------------------------------------------
# Machine description and main
# ---------------------------------------------------------------------------

def first_line_of(command):
    try:
        output = subprocess.run(command, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, timeout=30,
                                stdin=subprocess.DEVNULL).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in output.decode("utf-8", "replace").splitlines():
        if line.strip() and "cannot open the user configuration" not in line:
            return line.strip()
    return None


def describe_machine():
    machine = {"cores": os.cpu_count(), "python": platform.python_version(),
               "platform": platform.platform()}
    try:
        with open("/proc/cpuinfo") as source:
            for line in source:
                if line.startswith("model name"):
                    machine["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as source:
            for line in source:
                if line.startswith("MemTotal:"):
                    machine["memory_gib"] = round(
                        int(line.split()[1]) / (1 << 20), 1)
    except OSError:
        pass
    if shutil.which("povray"):
        machine["povray"] = first_line_of(["povray", "--version"])
    if shutil.which("convert"):
        machine["convert"] = first_line_of(["convert", "-version"])
    return machine


MEASURES = {
    "render": measure_render,
    "cycles": measure_cycles,
    "stitch": measure_stitch,
    "upload-memory": measure_upload_memory,
    "claims": measure_claims,
}


def parse_arguments(argv):
    parser = argparse.ArgumentParser(
        description="Run httpov's benchmarks. Each result is a ratio "
        "against a baseline measured in the same run.")
    parser.add_argument("--quick", action="store_true",
                        help="run a reduced version of every measure "
                        "(under a minute on 2 cores)")
    parser.add_argument("--json", metavar="FILE",
                        help="also write the results to FILE as JSON")
    parser.add_argument("--only", metavar="NAMES",
                        help="comma-separated measures to run (default: "
                        "all of %s)" % ", ".join(ALL_MEASURES))
    parser.add_argument("--serve-bare", metavar="PORT_FILE",
                        help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run_measures(names, quick):
    """Run the named measures in a scratch folder; return their rows.

    A measure that raises Skipped gets a SKIP row, and one that raises
    anything else gets an ERROR row, so the other measures still run.
    """
    rows = []
    # 0755, because the render user must reach httpov render's folders.
    scratch = tempfile.mkdtemp(prefix="httpov-bench-")
    os.chmod(scratch, 0o755)
    try:
        for name in names:
            folder = os.path.join(scratch, name)
            os.makedirs(folder)
            os.chmod(folder, 0o755)
            say("%s: starting" % name)
            started = time.perf_counter()
            try:
                new_rows = MEASURES[name](quick, folder)
            except Skipped as reason:
                new_rows = [skipped_row(name, str(reason))]
            except Exception as error:
                traceback.print_exc()
                new_rows = [failed_row(name, "%s: %s"
                                       % (type(error).__name__, error))]
            for row in new_rows:
                row["details"]["measure_seconds"] = round(
                    time.perf_counter() - started, 2)
            rows.extend(new_rows)
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return rows


def main(argv=None):
    args = parse_arguments(argv)
    if args.serve_bare:
        return serve_bare(args.serve_bare)

    names = ALL_MEASURES
    if args.only:
        names = [name.strip() for name in args.only.split(",")
                 if name.strip()]
        unknown = [name for name in names if name not in MEASURES]
        if unknown:
            sys.stderr.write("unknown measure %s: choose from %s\n"
                             % (", ".join(unknown), ", ".join(ALL_MEASURES)))
            return 2

    quick = 1 if args.quick else 0
    machine = describe_machine()
    say("machine: %s, %s cores, Python %s" % (
        machine.get("cpu", "unknown CPU"), machine["cores"],
        machine["python"]))
    started = time.perf_counter()
    rows = run_measures(names, quick)
    total = time.perf_counter() - started

    print("httpov benchmarks (%s), %.1f s" % ("quick" if quick else "full",
                                             total))
    print_table(rows)
    if args.json:
        with open(args.json, "w") as target:
            json.dump({"quick": bool(quick), "seconds": round(total, 2),
                       "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                       "machine": machine, "measures": rows},
                      target, indent=2)
            target.write("\n")
    failed = [row for row in rows if row["status"] == "ERROR"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
