#!/usr/bin/env python3
"""httpov: a distributed POV-Ray render farm in one file.

One central server hands out work over HTTP. Any number of workers fetch it,
run POV-Ray and send the pictures back. A job is a POV-Ray scene with its
includes (a folder, a .zip, or one .pov/.ini file). The server splits it into
tasks: ranges of animation frames, or horizontal slices of a frame, or both.
It stitches slices into whole frames and hands out finished PNGs.

Needs only Python 3.6 or newer and POV-Ray 3.7. The server also needs the
``sqlite3`` module, which is imported only when serving.

Commands: ``serve``, ``token``, ``work``, ``submit``, ``status``, ``fetch``,
``job`` and ``render`` (an embedded server plus local workers in one
process). Run ``python3 httpov.py COMMAND --help`` for the options.

Task life cycle
    queued -> leased -> done, or leased -> queued again when the worker
    reports a failure, releases the task or stops renewing its lease, until
    the task runs out of attempts and becomes failed (and so does its job).
    A lease belongs to one attempt, which has a random id and a deadline on
    the server's clock. Claiming a task is one SQLite write transaction, so
    no task is leased twice at once. Heartbeats and results name their
    attempt, and the server responds 409 to an attempt that is no longer
    current. A result is accepted only after its PNGs have been checked.

Storage
    The data folder contains ``httpov.sqlite3`` (WAL mode), ``tokens.json``,
    job archives under ``archives/<sha256>.zip``, finished frames under
    ``frames/<job>/``, slices waiting to be stitched under ``slices/`` and
    the archives that old clients download under ``legacy/<job>/``.
    Every file is written under a temporary name first (mostly in
    ``tmp/``) and renamed into place.

Security model
    ``serve`` creates two random tokens on first start. The admin token
    submits and controls jobs and opens the status page. The worker token
    only claims tasks, downloads archives and delivers results. Every API
    call without a valid token gets 401. The status page takes the admin
    token once in its query string and then uses an HttpOnly cookie, which
    allows reading; changes also need the page's CSRF token. Archives are
    checked before they are stored or unpacked (no absolute paths, no
    "..", no links, size and file-count limits), and no name from a
    request becomes a path on disk unchecked. A scene is a program that
    POV-Ray 3.7 does not confine, so run workers as a user that owns no
    secrets. The HTTPov 0.9 protocol of old clients carries no token: it
    is served only under a path that contains the worker token, or at the
    root to the networks named by ``serve --legacy-clients``.

Sections of this file, in the order data flows through them
    1. Constants and errors
    2. POV-Ray settings: INI files and command-line options
    3. Jobs: archives, scenes and task splitting
    4. Images: PNG and PPM reading, writing, cropping and stitching
    5. Storage: the SQLite schema and every query
    6. HTTP server: the JSON API and the status page
    7. Old clients: the HTTPov 0.9 protocol
    8. HTTP client, shared by the worker and the CLI
    9. Worker: running POV-Ray
    10. Command line
"""

import argparse
import collections
import contextlib
import hashlib
import hmac
import html
import http
import http.client
import http.server
import io
import ipaddress
import json
import logging
import ntpath
import os
import random
import re
import secrets
import shutil
import signal
import socket
import socketserver
import ssl
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import zipfile
import zlib

__version__ = "0.1.0"


# ===========================================================================
# 1. Constants and errors
# ===========================================================================

DEFAULT_PORT = 8080
DEFAULT_LEASE_SECONDS = 120
MIN_LEASE_SECONDS = 2             # shorter leases expire between heartbeats
DEFAULT_MAX_ATTEMPTS = 3
IDLE_POLL_SECONDS = 2.0           # how long a worker waits when idle
MAX_IDLE_POLL_SECONDS = 5.0       # cap of the idle wait
MAX_HEARTBEAT_SECONDS = 10.0      # heartbeat interval: lease/4, at most
RETRY_MIN_SECONDS = 1.0           # first wait after a network error
RETRY_MAX_SECONDS = 60.0          # cap of the exponential backoff
HOUSEKEEPING_SECONDS = 2.0        # how often the server expires leases
SQLITE_BUSY_SECONDS = 10.0        # wait for a database lock, then 503
WORKER_JOB_FAILURE_LIMIT = 3      # failed tasks before a worker is kept
WORKER_JOB_COOLDOWN_SECONDS = 600  # ... away from that job this long
DEFAULT_STALL_SECONDS = 600       # no POV-Ray output this long: stop it
DEFAULT_MAX_TASK_SECONDS = 86400  # wall-clock limit of one task
DEFAULT_MEMORY_MIB = 4096         # address space of POV-Ray; 256 MiB
                                  # already broke normal scenes
MEMORY_MIB_PER_THREAD = 128       # ... plus this per render thread
MAX_RENDER_FILE_BYTES = 8 << 30   # largest file POV-Ray may write
DEFAULT_MAX_TASK_DISK_MIB = 16384  # files in a task's folder, in total
# NOTE: without the sandbox a scene can also write outside its task folder,
# where neither this limit nor MIN_FREE_DISK_MIB counts the files.
MIN_FREE_DISK_MIB = 256           # below this free space, a large task
                                  # is stopped
MAX_RENDER_OPEN_FILES = 256
MAX_RENDER_PROCESSES = 1024       # processes and threads of the user

MAX_JOB_BYTES = 1 << 30           # 1 GiB: one uploaded job archive
MAX_RESULT_BYTES = 2 << 30        # 2 GiB: one task's result upload
MAX_JSON_BYTES = 1 << 20          # 1 MiB: any JSON request body
MAX_UNPACKED_BYTES = 4 << 30      # 4 GiB: a job archive once unpacked
UNPACKED_PER_JOB_BYTE = 4         # server: unpacked limit per upload byte
MAX_ARCHIVE_FILES = 10000         # files in one job archive
MAX_COMPRESSION_RATIO = 200       # unpacked/packed size that means a bomb
MAX_IMAGE_SIDE = 32768            # pixels: width or height of a frame
MAX_PIXELS = 1 << 28              # pixels in one frame (16384 x 16384)
MAX_FRAMES = 1000000              # frames in one job
MAX_WHOLE_NUMBER = 1 << 62        # fits SQLite's 64-bit integers
PREVIEW_FRAMES = 16               # frames handed out first, spread evenly
DEFAULT_TARGET_TASK_SECONDS = 30  # adaptive tasks grow toward this
MAX_MERGED_FRAMES = 1000          # frames in one adaptive task
MAX_TASKS = 2000000               # tasks in one job
MAX_LOG_BYTES = 64 * 1024         # tail of POV-Ray's output kept per task
MAX_POVRAY_OPTIONS = 100          # POV-Ray options given at submit
HTTP_TIMEOUT_SECONDS = 60         # socket timeout of server and client
CLIENT_IDLE_SECONDS = 15          # clients reuse connections idle less
HEADER_TIMEOUT_SECONDS = 20       # request line and headers, and idle
                                  # keep-alive connections
MIN_UPLOAD_BYTES_PER_SECOND = 64 * 1024  # slower bodies are cut off
MAX_HEADER_BYTES = 16 * 1024      # all request headers together
DEFAULT_MAX_CONNECTIONS = 512     # connections handled at once
DEFAULT_MAX_ADDRESS_CONNECTIONS = 256  # ... of them from one address
COPY_CHUNK_BYTES = 1 << 20        # 1 MiB: streaming buffer size
MAX_DRAINED_BYTES = 16 << 20      # 16 MiB: rejected body still read, so
                                  # the client sees the error response

TOKEN_BYTES = 32
SESSION_COOKIE = "httpov_session"

log = logging.getLogger("httpov")
server_log = logging.getLogger("httpov.server")
worker_log = logging.getLogger("httpov.worker")
client_log = logging.getLogger("httpov.client")


class UserError(Exception):
    """Invalid input from a person or a client, with a message for them."""

    status = 400


class NotFound(UserError):
    status = 404


class Conflict(UserError):
    """A request that no longer fits the state, such as a stale attempt."""

    status = 409


class TooLarge(UserError):
    status = 413


class Unauthorized(UserError):
    status = 401


class MethodNotAllowed(UserError):
    status = 405


class LengthRequired(UserError):
    status = 411


class Unavailable(UserError):
    """The server cannot do this now; the client may try again later."""

    status = 503
    headers = {"Retry-After": "30"}


class HelperFailed(UserError):
    """A program the server runs for a request, such as ffmpeg, failed."""

    status = 500


def parse_int(text, what, minimum=None, maximum=None):
    """Parse a whole number or raise UserError naming ``what``."""
    if not re.match(r"^\s*[-+]?[0-9]{1,18}\s*$", str(text)):
        raise UserError("invalid %s %r: expected a whole number"
                        % (what, text))
    value = int(str(text).strip())
    if minimum is not None and value < minimum:
        raise UserError("invalid %s %d: must be at least %d"
                        % (what, value, minimum))
    if maximum is not None and value > maximum:
        raise UserError("invalid %s %d: must be at most %d"
                        % (what, value, maximum))
    return value


def json_field(body, name, kind, default=None, required=False):
    """Read one field of a JSON request body, checking its type.

    ``kind`` is str, int or float. Raises UserError naming the field.
    """
    value = body.get(name, default)
    if value is None:
        if required:
            raise UserError("missing field %r in the request body" % name)
        return default
    if kind is float and isinstance(value, int) and \
            not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise UserError("invalid field %r: expected %s, got %r"
                        % (name, {str: "a string", int: "a whole number",
                                  float: "a number"}[kind], value))
    if kind is int and abs(value) > MAX_WHOLE_NUMBER:
        raise UserError("invalid field %r: %d is out of range"
                        % (name, value))
    if kind is str:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise UserError("invalid field %r: not valid Unicode" % name)
    return value


def parse_frame_range(text):
    """Parse ``FIRST-LAST`` or ``N`` into a (first, last) pair."""
    match = re.match(r"^\s*(-?\d+)\s*(?:-\s*(-?\d+)\s*)?$", str(text))
    if not match:
        raise UserError("invalid frame range %r: expected FIRST-LAST, "
                        "for example 1-24" % (text,))
    first = int(match.group(1))
    last = int(match.group(2)) if match.group(2) is not None else first
    if last < first:
        raise UserError("invalid frame range %r: the last frame comes "
                        "before the first" % (text,))
    return first, last


@contextlib.contextmanager
def atomic_output(path, suffix=""):
    """Yield a binary file that replaces ``path`` once fully written.

    The data goes to a temporary name beside ``path``, is synced to disk
    and renamed, so a half-written file is never visible. On an error
    the temporary file is removed.
    """
    folder = os.path.dirname(os.path.abspath(path))
    handle, temp_path = tempfile.mkstemp(dir=folder, prefix=".tmp-",
                                         suffix=suffix)
    try:
        with os.fdopen(handle, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp_path, path)
    except BaseException:
        remove_quietly(temp_path)
        raise


def write_file_atomically(path, data):
    """Write bytes to ``path`` through a temporary file and a rename."""
    with atomic_output(path) as out:
        out.write(data)


def plural(number, noun):
    """Return "1 frame" or "3 frames"."""
    return "%d %s%s" % (number, noun, "" if number == 1 else "s")


def printable(text, limit=500):
    """Return text safe for one log line: control characters escaped."""
    text = str(text)[:limit]
    return re.sub(r"[\x00-\x1f\x7f]",
                  lambda match: "\\x%02x" % ord(match.group()), text)


def remove_quietly(path):
    try:
        os.remove(path)
    except OSError:
        pass


def sha256_of_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        for chunk in iter(lambda: source.read(COPY_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ===========================================================================
# 2. POV-Ray settings: INI files and command-line options
# ===========================================================================
#
# The server reads only the settings that shape the work: image size,
# animation, output depth and alpha, render block size and the scene file.
# Everything else (quality, antialiasing, declares) is passed through to
# POV-Ray untouched: the worker runs the job's INI, then the submit
# options, then its own options, and POV-Ray lets later options win.

# INI keys (lower case) and command-line switches (upper case, longest
# prefix first) mapped onto setting names.
INI_KEYS = {
    "width": "width",
    "height": "height",
    "input_file_name": "input_file",
    "output_file_name": "output_file",
    "initial_frame": "initial_frame",
    "final_frame": "final_frame",
    "initial_clock": "initial_clock",
    "final_clock": "final_clock",
    "clock": "clock",
    "subset_start_frame": "subset_start",
    "subset_end_frame": "subset_end",
    "cyclic_animation": "cyclic",
    "output_file_type": "file_type",
    "bits_per_color": "depth",
    "output_alpha": "alpha",
    "render_block_size": "block_size",
    "start_row": "start_row",
    "end_row": "end_row",
    "start_column": "start_column",
    "end_column": "end_column",
    "include_header": "include_header",
    "create_ini": "stream_file",
    "all_file": "stream_file",
    "debug_file": "stream_file",
    "fatal_file": "stream_file",
    "render_file": "stream_file",
    "statistic_file": "stream_file",
    "warning_file": "stream_file",
}

SWITCHES = [
    ("KFI", "initial_frame"), ("KFF", "final_frame"),
    ("KI", "initial_clock"), ("KF", "final_clock"), ("KC", "cyclic"),
    ("K", "clock"),
    ("SF", "subset_start"), ("EF", "subset_end"),
    ("SR", "start_row"), ("ER", "end_row"),
    ("SC", "start_column"), ("EC", "end_column"),
    ("UA", "alpha"), ("BS", "block_size"), ("HI", "include_header"),
    ("GA", "stream_file"), ("GD", "stream_file"), ("GF", "stream_file"),
    ("GI", "stream_file"), ("GR", "stream_file"), ("GS", "stream_file"),
    ("GW", "stream_file"),
    ("W", "width"), ("H", "height"), ("I", "input_file"),
    ("O", "output_file"), ("F", "file_type"),
]

# Settings that only the worker may set, because the farm chooses them.
FARM_SETTINGS = {
    "output_file": "the farm names the output files",
    "subset_start": "use the job option --frames FIRST-LAST",
    "subset_end": "use the job option --frames FIRST-LAST",
    "start_row": "use the job options --slices or --rows-per-slice",
    "end_row": "use the job options --slices or --rows-per-slice",
    "start_column": "partial columns are not supported",
    "end_column": "partial columns are not supported",
}

# INI keys that make POV-Ray run shell commands.
SHELL_KEYS = {
    "pre_scene_command", "pre_frame_command", "post_scene_command",
    "post_frame_command", "user_abort_command", "fatal_error_command",
}

TRUE_WORDS = {"on", "true", "yes", "1"}
FALSE_WORDS = {"off", "false", "no", "0"}


def parse_switch(word):
    """Split one POV-Ray switch such as ``+W640`` into (setting, value).

    Returns (None, None) for switches the farm passes through unread.
    A boolean switch returns True for ``+`` and False for ``-``.
    """
    sign, body = word[0], word[1:]
    upper = body.upper()
    for prefix, setting in SWITCHES:
        if not upper.startswith(prefix):
            continue
        rest = body[len(prefix):]
        if setting in ("cyclic", "alpha"):
            if rest:
                continue
            return setting, sign == "+"
        if setting == "file_type":
            return setting, rest
        if setting in ("input_file", "output_file", "include_header",
                       "stream_file"):
            return setting, rest
        if rest == "" or not re.match(r"^[0-9.eE+-]+$", rest):
            # ``+H`` alone toggles nothing we read, and ``+HT...`` or
            # ``+KFX`` are other switches with the same first letters.
            continue
        return setting, rest
    return None, None


def read_ini_text(text, source="INI"):
    """Parse POV-Ray INI text into a list of (setting, value) pairs.

    Like POV-Ray called without a section name, this reads the lines
    before the first ``[section]`` label. Lines may hold ``Key=Value``
    pairs or switches, and ``;`` starts a comment. Unknown keys are kept
    as (None, line) so that callers can see them; shell-command keys
    raise UserError.
    """
    pairs = []
    for number, raw_line in enumerate(text.splitlines(), 1):
        line = raw_line.split(";", 1)[0].strip()
        if not line:
            continue
        if line.startswith("["):
            break
        if "=" in line and not line[0] in "+-":
            key, _, value = line.partition("=")
            key = key.strip().lower()
            value = value.strip().strip('"')
            if key in SHELL_KEYS:
                raise UserError("%s line %d: %s runs a shell command, "
                                "which the farm does not allow; remove it"
                                % (source, number, key.title()))
            if key == "include_ini":
                raise UserError("%s line %d: Include_Ini reads another INI "
                                "file, which the farm would not check; "
                                "move its settings into this INI"
                                % (source, number))
            pairs.append((INI_KEYS.get(key), value))
            continue
        for word in line.split():
            if word[0] in "+-" and len(word) > 1:
                pairs.append(parse_switch(word))
            elif word.lower().endswith(".pov"):
                pairs.append(("input_file", word))
            else:
                raise UserError("%s line %d: %r is neither a setting nor "
                                "a switch (nested INI files are not "
                                "supported)" % (source, number, word))
    return pairs


def read_povray_options(options):
    """Check the POV-Ray options given at submit; return (setting, value).

    Options are switches (``+W640``) or ``Key=Value`` pairs, as on
    POV-Ray's command line.
    """
    if len(options) > MAX_POVRAY_OPTIONS:
        raise UserError("too many POV-Ray options (%d, at most %d)"
                        % (len(options), MAX_POVRAY_OPTIONS))
    pairs = []
    for option in options:
        if not isinstance(option, str) or not option.strip():
            raise UserError("invalid POV-Ray option %r" % (option,))
        if "\n" in option or "\r" in option or "\0" in option:
            raise UserError("invalid POV-Ray option %r: it contains a "
                            "line break or NUL" % (option,))
        if ";" in option:
            raise UserError("invalid POV-Ray option %r: ';' starts a "
                            "comment in POV-Ray settings; give each option "
                            "as its own argument" % (option,))
        if re.search(r"\s", option):
            # POV-Ray splits an argument at white space again, so one
            # argument could smuggle in options that were never checked.
            raise UserError("invalid POV-Ray option %r: it contains white "
                            "space; give each option as its own argument"
                            % (option,))
        if option[0] in "+-" and len(option) > 1:
            pairs.append(parse_switch(option))
        elif "=" in option:
            pairs.extend(read_ini_text(option, "POV-Ray option"))
        else:
            raise UserError("invalid POV-Ray option %r: expected a switch "
                            "such as +W640 or a Key=Value setting"
                            % (option,))
    for setting, value in pairs:
        if setting in FARM_SETTINGS:
            raise UserError("POV-Ray option for %s is set by the farm: %s"
                            % (setting.replace("_", " "),
                               FARM_SETTINGS[setting]))
    check_written_files(pairs, "POV-Ray option")
    return pairs


def check_written_files(pairs, source):
    """Reject settings that make POV-Ray write files of its own choice.

    Stream files (``+GF<file>``, ``All_File=...``) and ``Create_Ini``
    could write anywhere the worker can. Turning a stream on or off
    without a file name is fine.
    """
    for setting, value in pairs:
        if setting != "stream_file":
            continue
        word = str(value).strip().lower()
        if word and word not in TRUE_WORDS and word not in FALSE_WORDS:
            raise UserError("%s writes POV-Ray's output to the file %r, "
                            "which the farm does not allow; the task log "
                            "keeps that output" % (source, value))


def parse_bool(value, what):
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise UserError("invalid %s %r: expected on or off" % (what, value))


def parse_number(value, what):
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError("invalid %s %r: expected a number" % (what, value))
    if number != number or number in (float("inf"), float("-inf")):
        raise UserError("invalid %s %r: expected a finite number"
                        % (what, value))
    return number


def parse_whole(value, what):
    """Parse a whole number that POV-Ray may write as ``640.0``."""
    number = parse_number(value, what)
    if abs(number) > MAX_WHOLE_NUMBER or number != int(number):
        raise UserError("invalid %s %r: expected a whole number"
                        % (what, value))
    return int(number)


def resolve_settings(pairs):
    """Fold (setting, value) pairs, later ones winning, into job settings.

    Returns a dict with width, height, animated, initial_frame,
    final_frame, subset_start, subset_end, cyclic, depth, alpha,
    block_size and input_file, with POV-Ray 3.7's defaults filled in.
    """
    raw = {}
    for setting, value in pairs:
        if setting is not None:
            raw[setting] = value
    for setting in ("start_row", "end_row", "start_column", "end_column"):
        if setting in raw:
            raise UserError("the INI sets %s, which the farm chooses "
                            "itself: %s; remove it"
                            % (setting.replace("_", " ").title(),
                               FARM_SETTINGS[setting]))

    settings = {
        "width": parse_whole(raw.get("width", 800), "width"),
        "height": parse_whole(raw.get("height", 600), "height"),
        "input_file": raw.get("input_file") or None,
        "cyclic": parse_bool(raw.get("cyclic", False), "Cyclic_Animation"),
        "alpha": parse_bool(raw.get("alpha", False), "Output_Alpha"),
        "block_size": parse_whole(raw.get("block_size", 32),
                                  "Render_Block_Size"),
    }
    for side in ("width", "height"):
        if not 1 <= settings[side] <= MAX_IMAGE_SIDE:
            raise UserError("invalid %s %d: must be 1 to %d pixels"
                            % (side, settings[side], MAX_IMAGE_SIDE))
    if settings["width"] * settings["height"] > MAX_PIXELS:
        raise UserError("image of %dx%d is too large (at most %d pixels)"
                        % (settings["width"], settings["height"],
                           MAX_PIXELS))
    if settings["block_size"] < 1:
        raise UserError("invalid Render_Block_Size %d: must be at least 1"
                        % settings["block_size"])

    depth = 8
    file_type = str(raw.get("file_type", ""))
    type_depth = re.sub(r"^[A-Za-z]", "", file_type)
    if "depth" in raw:
        depth = parse_whole(raw["depth"], "Bits_Per_Color")
    if type_depth:
        depth = parse_whole(type_depth, "output file depth")
    if not 1 <= depth <= 16:
        raise UserError("invalid Bits_Per_Color %d: must be 1 to 16"
                        % depth)
    settings["depth"] = 16 if depth > 8 else 8

    initial = parse_whole(raw.get("initial_frame", 1), "Initial_Frame")
    animated = "final_frame" in raw
    final = parse_whole(raw.get("final_frame", initial), "Final_Frame")
    if final < initial:
        raise UserError("invalid animation: Final_Frame %d comes before "
                        "Initial_Frame %d" % (final, initial))
    if final - initial + 1 > MAX_FRAMES:
        raise UserError("animation of %d frames is too long (at most %d)"
                        % (final - initial + 1, MAX_FRAMES))
    settings.update(animated=animated, initial_frame=initial,
                    final_frame=final)
    settings["initial_clock"] = parse_number(
        raw.get("initial_clock", 0), "Initial_Clock")
    settings["final_clock"] = parse_number(
        raw.get("final_clock", 1), "Final_Clock")
    settings["clock"] = parse_number(raw.get("clock", 0), "Clock")
    for name in ("subset_start", "subset_end"):
        if name in raw:
            settings[name] = parse_whole(raw[name], name.replace("_", " "))
    return settings


# ===========================================================================
# 3. Jobs: archives, scenes and task splitting
# ===========================================================================

JOB_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
SCENE_SUFFIXES = (".pov", ".ini")


def safe_file_name(name, fallback="job"):
    """Turn a job name into a file name of letters, digits, ``.-_``."""
    cleaned = JOB_NAME_CHARS.sub("_", name).strip("._")[:64]
    return cleaned or fallback


def check_member_name(name):
    """Raise UserError unless ``name`` is a safe relative archive path."""
    if not name or "\0" in name:
        raise UserError("archive member with an empty or NUL name")
    if re.search(r"[\x00-\x1f\x7f]", name):
        raise UserError("archive member %r has a control character (such "
                        "as a line break) in its name; rename it" % name)
    if "\\" in name:
        raise UserError("archive member %r uses backslashes; make the "
                        "archive with forward slashes" % name)
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise UserError("archive member %r has an absolute path" % name)
    parts = name.rstrip("/").split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise UserError("archive member %r has an empty, '.' or '..' "
                        "path component" % name)


def inspect_archive(path, max_unpacked=MAX_UNPACKED_BYTES):
    """Check a job archive and return its layout.

    Returns a dict with ``root`` (the folder inside the archive that acts
    as the job folder, "" for the top), ``files`` (paths relative to the
    root) and ``unpacked_bytes``. Raises UserError for anything unsafe:
    absolute or ``..`` paths, links, device files, duplicate names,
    encrypted members, too many files, too many bytes or a compression
    ratio that marks a zip bomb.
    """
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise UserError("job archive is not a valid zip file (%s)" % error)
    with archive:
        members = archive.infolist()
        if len(members) > MAX_ARCHIVE_FILES:
            raise UserError("job archive has %d members, more than the "
                            "limit of %d" % (len(members), MAX_ARCHIVE_FILES))
        seen = set()
        files = []
        unpacked = 0
        packed = 0
        for member in members:
            name = member.filename
            check_member_name(name)
            mode = member.external_attr >> 16
            file_type = stat.S_IFMT(mode)
            if file_type and file_type not in (stat.S_IFREG, stat.S_IFDIR):
                kind = "a symbolic link" if stat.S_ISLNK(mode) else \
                    "a device, pipe or socket"
                raise UserError("archive member %r is %s; only regular "
                                "files and folders are allowed"
                                % (name, kind))
            if member.flag_bits & 0x1:
                raise UserError("archive member %r is encrypted" % name)
            key = name.rstrip("/").lower()
            if key in seen:
                raise UserError("archive contains %r twice (names are "
                                "compared without case)" % name)
            seen.add(key)
            if name.endswith("/"):
                continue
            files.append(name)
            unpacked += member.file_size
            packed += member.compress_size
        if unpacked > max_unpacked:
            raise TooLarge("job archive unpacks to %d bytes, more than the "
                           "limit of %d" % (unpacked, max_unpacked))
        if unpacked > COPY_CHUNK_BYTES and \
                unpacked > MAX_COMPRESSION_RATIO * max(packed, 1):
            raise UserError("job archive unpacks to %d bytes from %d: a "
                            "compression ratio over %d looks like a zip "
                            "bomb" % (unpacked, packed,
                                      MAX_COMPRESSION_RATIO))
        try:
            broken = archive.testzip()
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError,
                NotImplementedError) as error:
            raise UserError("job archive is corrupt (%s)" % error)
        if broken is not None:
            raise UserError("job archive is corrupt: %r fails its CRC check"
                            % broken)
        file_keys = {name.lower() for name in files}
        for name in files:
            for parent in parent_folders(name):
                if parent.lower() in file_keys:
                    raise UserError("archive contains %r both as a file and "
                                    "as a folder" % parent)
    if not files:
        raise UserError("job archive is empty")

    root = ""
    tops = {name.split("/", 1)[0] for name in files}
    if len(tops) == 1 and all("/" in name for name in files):
        root = tops.pop() + "/"
    return {
        "root": root,
        "files": sorted(name[len(root):] for name in files),
        "unpacked_bytes": unpacked,
    }


def parent_folders(name):
    parts = name.split("/")[:-1]
    return ["/".join(parts[:index]) for index in range(1, len(parts) + 1)]


def read_archive_text(path, member):
    with zipfile.ZipFile(path) as archive:
        data = archive.read(member)
    if len(data) > MAX_JSON_BYTES:
        raise UserError("%s is too large for an INI file" % member)
    return data.decode("utf-8", "replace")


def choose_scene(layout, requested=None):
    """Pick the job's INI and/or scene file from the archive layout.

    Returns (ini, pov): paths relative to the job folder, either may be
    None. ``requested`` is the job option --scene.
    """
    files = layout["files"]
    top_level = [name for name in files if "/" not in name]
    if requested:
        if requested not in files:
            raise UserError("scene %r not found in the job (files: %s)"
                            % (requested, ", ".join(top_level[:20])))
        if requested.lower().endswith(".ini"):
            return requested, None
        if requested.lower().endswith(".pov"):
            return None, requested
        raise UserError("scene %r is neither a .pov nor an .ini file"
                        % requested)
    inis = [name for name in top_level if name.lower().endswith(".ini")]
    povs = [name for name in top_level if name.lower().endswith(".pov")]
    inis = [name for name in inis if name.lower() != "povray.ini"] or inis
    if len(inis) == 1:
        return inis[0], None
    if "pov.ini" in inis:
        return "pov.ini", None
    if len(inis) > 1:
        raise UserError("the job has several INI files (%s); choose one "
                        "with --scene" % ", ".join(inis))
    if len(povs) == 1:
        return None, povs[0]
    if povs:
        raise UserError("the job has several scene files (%s) and no INI; "
                        "choose one with --scene" % ", ".join(povs))
    raise UserError("the job contains no .ini or .pov file at its top "
                    "level (files: %s)" % ", ".join(files[:20]))


def plan_slices(height, block_size, slices=None, rows_per_slice=None):
    """Split ``height`` rows into slices; return [(first, last), ...].

    Rows are 1-based and inclusive, as POV-Ray counts them. Every slice
    starts at row 1 + k * block_size, because POV-Ray lays out its
    antialiasing blocks from the top of the render area and only slices
    aligned to them match a full render byte for byte. A slice has at
    least two rows, so that no end row is 1, which POV-Ray would read as
    the fraction 1.0 (all rows).
    """
    if slices is not None:
        wanted = -(-height // max(int(slices), 1))
    elif rows_per_slice is not None:
        wanted = int(rows_per_slice)
    else:
        return [(1, height)]
    rows = -(-max(wanted, 2) // block_size) * block_size
    rows = max(rows, 2)
    return [(first, min(first + rows - 1, height))
            for first in range(1, height + 1, rows)]


def preview_order(first_frame, last_frame, preview=PREVIEW_FRAMES):
    """Yield the frames in the order they are handed out.

    Every Nth frame comes first, so that the first finished frames give a
    preview of the whole animation, then the others in order.
    """
    count = last_frame - first_frame + 1
    # At most a quarter of a short animation goes first, so that the
    # rest can still be merged into longer tasks.
    preview = max(1, min(preview, count // 4))
    stride = max(1, -(-count // preview))
    early = range(first_frame, last_frame + 1, stride)
    for frame in early:
        yield frame
    for frame in range(first_frame, last_frame + 1):
        if (frame - first_frame) % stride:
            yield frame


def plan_tasks(first_frame, last_frame, row_ranges, frames_per_task):
    """Yield (frame_first, frame_last, row_first, row_last) for each task.

    Sliced jobs get one task per slice of each frame, slices top to
    bottom. Jobs with ``frames_per_task`` 0 (adaptive) get one task per
    frame, which the server merges into longer runs as it learns how
    long frames take. Both hand out frames in preview order. Other jobs
    get runs of ``frames_per_task`` frames, in order.
    """
    if len(row_ranges) > 1:
        for frame in preview_order(first_frame, last_frame):
            for row_first, row_last in row_ranges:
                yield frame, frame, row_first, row_last
        return
    row_first, row_last = row_ranges[0]
    if not frames_per_task:
        for frame in preview_order(first_frame, last_frame):
            yield frame, frame, row_first, row_last
        return
    step = int(frames_per_task)
    for start in range(first_frame, last_frame + 1, step):
        yield start, min(start + step - 1, last_frame), row_first, row_last


def prepare_job(archive_path, options, max_unpacked=MAX_UNPACKED_BYTES):
    """Read a checked archive and the submit options into a job plan.

    Returns a dict with everything the database stores about the job.
    ``options`` contains name, frames, slices, rows_per_slice,
    frames_per_task, max_workers, priority, scene and povray_options.
    """
    layout = inspect_archive(archive_path, max_unpacked)
    ini, pov = choose_scene(layout, options.get("scene"))
    pairs = []
    if ini:
        text = read_archive_text(archive_path, layout["root"] + ini)
        pairs.extend(read_ini_text(text, ini))
        check_written_files(pairs, ini)
    povray_options = list(options.get("povray_options") or [])
    pairs.extend(read_povray_options(povray_options))
    settings = resolve_settings(pairs)

    input_file = pov or settings["input_file"]
    if not input_file:
        povs = [name for name in layout["files"]
                if "/" not in name and name.lower().endswith(".pov")]
        if len(povs) != 1:
            raise UserError("%s names no Input_File_Name and the job does "
                            "not hold exactly one .pov file; add "
                            "Input_File_Name to the INI" % ini)
        input_file = povs[0]
    input_file = input_file.replace("\\", "/")
    if input_file.startswith("./"):
        input_file = input_file[2:]
    check_member_name(input_file)
    if input_file not in layout["files"] and \
            input_file + ".pov" in layout["files"]:
        input_file += ".pov"
    if input_file not in layout["files"]:
        raise UserError("scene file %r not found in the job (files: %s)"
                        % (input_file, ", ".join(layout["files"][:20])))
    settings["input_file"] = input_file
    for setting, value in pairs:
        if setting == "include_header" and value:
            header = value.replace("\\", "/")
            check_member_name(header)
            if header not in layout["files"]:
                raise UserError("include header %r (+HI) not found in the "
                                "job; it must be a file of the job"
                                % value)

    if settings["animated"]:
        first = settings.get("subset_start", settings["initial_frame"])
        last = settings.get("subset_end", settings["final_frame"])
        if options.get("frames"):
            first, last = parse_frame_range(options["frames"])
        if first < settings["initial_frame"] or \
                last > settings["final_frame"] or last < first:
            raise UserError(
                "invalid frames %d-%d: the animation has frames %d-%d"
                % (first, last, settings["initial_frame"],
                   settings["final_frame"]))
    else:
        if options.get("frames"):
            raise UserError("--frames given, but the scene is not an "
                            "animation; set Final_Frame in the INI or "
                            "pass +KFF<n> after --")
        first = last = 0

    slices = options.get("slices")
    rows_per_slice = options.get("rows_per_slice")
    if slices is not None and rows_per_slice is not None:
        raise UserError("give --slices or --rows-per-slice, not both")
    if slices is not None:
        slices = parse_int(slices, "slices", 1, settings["height"])
    if rows_per_slice is not None:
        rows_per_slice = parse_int(rows_per_slice, "rows per slice", 1,
                                   MAX_IMAGE_SIDE)
    row_ranges = plan_slices(settings["height"], settings["block_size"],
                             slices, rows_per_slice)
    frames_per_task = 0
    if options.get("frames_per_task") is not None:
        frames_per_task = parse_int(options["frames_per_task"],
                                    "frames per task", 1, MAX_FRAMES)
    task_count = (last - first + 1) * len(row_ranges)
    if len(row_ranges) == 1 and frames_per_task:
        task_count = -(-(last - first + 1) // frames_per_task)
    if task_count > MAX_TASKS:
        raise UserError("job would have %d tasks, more than the limit of "
                        "%d; use fewer slices or more frames per task"
                        % (task_count, MAX_TASKS))

    name = str(options.get("name") or "").strip()
    if not name:
        name = os.path.splitext(os.path.basename(
            (ini or input_file).rstrip("/")))[0]
    if len(name) > 200 or any(ord(char) < 32 for char in name):
        raise UserError("invalid job name %r: at most 200 characters and "
                        "no control characters" % name[:60])
    return {
        "name": name,
        "root": layout["root"],
        "ini": ini,
        "settings": settings,
        "povray_options": povray_options,
        "first_frame": first,
        "last_frame": last,
        "row_ranges": row_ranges,
        "sliced": len(row_ranges) > 1,
        "frames_per_task": frames_per_task,
        "task_count": task_count,
        "priority": parse_int(options.get("priority") or 0, "priority",
                              -1000000, 1000000),
        "max_workers": parse_int(options.get("max_workers") or 0,
                                 "max workers", 0, 1000000),
    }


def frame_file_name(job_name, frame, settings):
    """Return the file name under which ``fetch`` saves a frame."""
    base = safe_file_name(job_name)
    if not settings["animated"]:
        return base + ".png"
    digits = len(str(settings["final_frame"] + int(settings["cyclic"])))
    return "%s_%0*d.png" % (base, digits, frame)


# ===========================================================================
# 4. Images: PNG and PPM reading, writing, cropping and stitching
# ===========================================================================
#
# POV-Ray writes a partial render as a full-size image whose rows outside
# the requested range are black. So the worker cuts a slice to its rows
# (the server does it for uploads that were not cut), and a slice is
# stored as a PNG of exactly those rows. Stitching then needs no pixel
# decoding: each PNG row is a filter byte plus filtered bytes that depend
# only on the row itself and the row above. Only the first row of each
# slice refers to a row of another image, so that one row is re-filtered
# and every other row is copied through zlib as it is.

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}    # colour type -> samples/pixel
PNG_KEPT_CHUNKS = (b"gAMA", b"sRGB", b"cHRM", b"iCCP", b"sBIT")
PNG_MAX_CHUNK_BYTES = 1 << 31
PNG_MAX_KEPT_CHUNK_BYTES = 1 << 20  # colour chunks; others are skipped
PNG_IDAT_BYTES = 1 << 16                    # size of the IDATs we write
MAX_PPM_HEADER_BYTES = 4096                 # POV-Ray 3.7's: about 140
DEFAULT_FRAME_DELAY_MS = 40                 # animated preview: 25 fps
MP4_FRAMES_PER_SECOND = 25
MAX_ENCODE_SECONDS = 1800                   # one ffmpeg run for an MP4
ZLIB_LEVEL = 6


class ImageInfo(collections.namedtuple(
        "ImageInfo", "width height depth color_type")):
    """Size and sample format of a PNG or PPM image."""

    @property
    def channels(self):
        return PNG_CHANNELS[self.color_type]

    @property
    def row_bytes(self):
        return self.width * self.channels * self.depth // 8

    @property
    def pixel_bytes(self):
        return max(1, self.channels * self.depth // 8)

    def describe(self):
        kinds = {0: "grey", 2: "RGB", 4: "grey+alpha", 6: "RGBA"}
        return "%dx%d %s %d-bit" % (self.width, self.height,
                                    kinds[self.color_type], self.depth)


class ImageError(UserError):
    """An image that cannot be decoded or does not have the right shape."""


def iter_png_chunks(stream):
    """Yield (type, data) for each chunk, checking CRCs.

    IDAT chunks are yielded in pieces of at most COPY_CHUNK_BYTES, so
    memory stays bounded whatever size the encoder chose for them.
    """
    if stream.read(8) != PNG_SIGNATURE:
        raise ImageError("not a PNG file (bad signature)")
    while True:
        header = stream.read(8)
        if len(header) < 8:
            raise ImageError("PNG file is truncated (no IEND chunk)")
        length, kind = struct.unpack(">I4s", header)
        if length >= PNG_MAX_CHUNK_BYTES:
            raise ImageError("PNG chunk length %d is invalid" % length)
        crc = zlib.crc32(kind)
        left = length
        pieces = []
        kept = kind in PNG_KEPT_CHUNKS or kind in (b"IHDR", b"IEND")
        if kept and length > PNG_MAX_KEPT_CHUNK_BYTES:
            raise ImageError("PNG chunk %r of %d bytes is too large"
                             % (kind.decode("latin-1"), length))
        while True:
            piece = stream.read(min(left, COPY_CHUNK_BYTES))
            if len(piece) < min(left, COPY_CHUNK_BYTES):
                raise ImageError("PNG file is truncated in a %r chunk"
                                 % kind.decode("latin-1"))
            crc = zlib.crc32(piece, crc)
            left -= len(piece)
            if kind == b"IDAT":
                if piece:
                    yield kind, piece
            elif kept:
                pieces.append(piece)
            if left == 0:
                break
        stored_crc = stream.read(4)
        if len(stored_crc) < 4 or \
                struct.unpack(">I", stored_crc)[0] != crc & 0xffffffff:
            raise ImageError("PNG chunk %r has a bad CRC"
                             % kind.decode("latin-1"))
        if kind != b"IDAT":
            yield kind, b"".join(pieces)
        if kind == b"IEND":
            return


def parse_ihdr(data):
    if len(data) != 13:
        raise ImageError("PNG IHDR chunk has the wrong length")
    width, height, depth, color_type, compression, filtering, interlace = \
        struct.unpack(">IIBBBBB", data)
    if color_type not in PNG_CHANNELS or depth not in (8, 16):
        raise ImageError("PNG colour type %d at depth %d is not supported "
                         "(only 8- or 16-bit grey, RGB and RGBA)"
                         % (color_type, depth))
    if compression != 0 or filtering != 0:
        raise ImageError("PNG uses an unknown compression or filter method")
    if interlace != 0:
        raise ImageError("interlaced PNGs are not supported")
    if not (1 <= width <= MAX_IMAGE_SIDE and 1 <= height <= MAX_IMAGE_SIDE):
        raise ImageError("PNG size %dx%d is out of range" % (width, height))
    return ImageInfo(width, height, depth, color_type)


def iter_png_scanlines(path):
    """Yield the image info, then (filter type, filtered row) per row.

    Raises ImageError for anything that does not decode to exactly the
    rows the header promises.
    """
    with open(path, "rb") as stream:
        chunks = iter_png_chunks(stream)
        kind, data = next(chunks)
        if kind != b"IHDR":
            raise ImageError("PNG does not start with an IHDR chunk")
        info = parse_ihdr(data)
        extra = []
        line_bytes = info.row_bytes + 1
        inflater = zlib.decompressobj()
        buffer = bytearray()
        rows = 0
        seen_idat = False
        ended = False
        for kind, data in chunks:
            if kind == b"IDAT":
                if ended:
                    raise ImageError("PNG has IDAT chunks after its end")
                if not seen_idat:
                    yield info, extra
                    seen_idat = True
                pending = data
                while pending:
                    try:
                        buffer += inflater.decompress(pending,
                                                      COPY_CHUNK_BYTES)
                    except zlib.error as error:
                        raise ImageError("PNG image data is corrupt (%s)"
                                         % error)
                    pending = inflater.unconsumed_tail
                    while len(buffer) >= line_bytes:
                        if rows == info.height:
                            raise ImageError("PNG contains more rows than its "
                                             "height of %d" % info.height)
                        filter_type = buffer[0]
                        if filter_type > 4:
                            raise ImageError("PNG row %d has invalid filter "
                                             "type %d" % (rows + 1,
                                                          filter_type))
                        yield filter_type, bytes(buffer[1:line_bytes])
                        del buffer[:line_bytes]
                        rows += 1
                if inflater.eof:
                    ended = True
            elif kind in PNG_KEPT_CHUNKS and not seen_idat:
                extra.append((kind, data))
        if not seen_idat:
            raise ImageError("PNG has no image data")
        if rows != info.height or buffer or not inflater.eof:
            raise ImageError("PNG image data is truncated: %d of %d rows"
                             % (rows, info.height))


def read_png_scanlines(path):
    """Return (info, extra chunks, scanline iterator) for a PNG file."""
    scanlines = iter_png_scanlines(path)
    info, extra = next(scanlines)
    return info, extra, scanlines


def unfilter_row(filter_type, line, prior, pixel_bytes):
    """Undo one PNG row filter; ``prior`` is the unfiltered row above."""
    if filter_type == 0:
        return line
    if filter_type == 2:
        if not any(line):
            return prior
        return bytes([(x + b) & 255 for x, b in zip(line, prior)])
    row = bytearray(line)
    count = len(row)
    if filter_type == 1:
        for i in range(pixel_bytes, count):
            row[i] = (row[i] + row[i - pixel_bytes]) & 255
    elif filter_type == 3:
        for i in range(pixel_bytes):
            row[i] = (row[i] + (prior[i] >> 1)) & 255
        for i in range(pixel_bytes, count):
            row[i] = (row[i] + ((row[i - pixel_bytes] + prior[i]) >> 1)) \
                & 255
    else:
        for i in range(pixel_bytes):
            row[i] = (row[i] + prior[i]) & 255
        for i in range(pixel_bytes, count):
            left = row[i - pixel_bytes]
            above = prior[i]
            corner = prior[i - pixel_bytes]
            estimate = left + above - corner
            to_left = abs(estimate - left)
            to_above = abs(estimate - above)
            to_corner = abs(estimate - corner)
            if to_left <= to_above and to_left <= to_corner:
                predictor = left
            elif to_above <= to_corner:
                predictor = above
            else:
                predictor = corner
            row[i] = (row[i] + predictor) & 255
    return bytes(row)


def iter_png_rows(path):
    """Yield the image info, then every unfiltered row as bytes."""
    info, extra, scanlines = read_png_scanlines(path)
    yield info, extra
    prior = bytes(info.row_bytes)
    zero_row = prior
    for filter_type, line in scanlines:
        if line == zero_row and prior == zero_row:
            row = zero_row
        else:
            row = unfilter_row(filter_type, line, prior, info.pixel_bytes)
        yield row
        prior = row


def png_chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data +
            struct.pack(">I", zlib.crc32(kind + data) & 0xffffffff))


def write_png_head(out, info, extra=()):
    """Write the signature, IHDR and the kept colour chunks of a PNG."""
    out.write(PNG_SIGNATURE)
    out.write(png_chunk(b"IHDR", struct.pack(
        ">IIBBBBB", info.width, info.height, info.depth, info.color_type,
        0, 0, 0)))
    for kind, data in extra:
        out.write(png_chunk(kind, data))


def write_png(path, info, scanlines, extra=()):
    """Write a PNG from an iterable of (filter type, filtered row).

    The file is written to a temporary name beside ``path`` and renamed,
    so a half-written PNG is never visible.
    """
    with atomic_output(path, ".png") as out:
        write_png_head(out, info, extra)
        deflater = zlib.compressobj(ZLIB_LEVEL)
        pending = bytearray()
        rows = 0
        for filter_type, line in scanlines:
            if len(line) != info.row_bytes:
                raise ImageError("row %d has %d bytes, expected %d"
                                 % (rows + 1, len(line), info.row_bytes))
            pending += deflater.compress(bytes([filter_type]) + line)
            rows += 1
            while len(pending) >= PNG_IDAT_BYTES:
                out.write(png_chunk(b"IDAT",
                                    bytes(pending[:PNG_IDAT_BYTES])))
                del pending[:PNG_IDAT_BYTES]
        if rows != info.height:
            raise ImageError("image has %d rows, expected %d"
                             % (rows, info.height))
        pending += deflater.flush()
        for start in range(0, len(pending), PNG_IDAT_BYTES):
            out.write(png_chunk(
                b"IDAT", bytes(pending[start:start + PNG_IDAT_BYTES])))
        out.write(png_chunk(b"IEND", b""))


def check_png(path, width=None, height=None, depth=None, alpha=None):
    """Decode a PNG's structure and check its size, bit depth and alpha
    channel where given; return its info."""
    info, _, scanlines = read_png_scanlines(path)
    if width is not None and (info.width, info.height) != (width, height):
        raise ImageError("image is %dx%d, expected %dx%d"
                         % (info.width, info.height, width, height))
    if depth is not None and info.depth != depth:
        raise ImageError("image is %s, expected %d bits per channel"
                         % (info.describe(), depth))
    if alpha is not None and (info.color_type in (4, 6)) != alpha:
        raise ImageError("image is %s, expected %s alpha channel"
                         % (info.describe(), "an" if alpha else "no"))
    for _ in scanlines:
        pass
    return info


def crop_png(source, target, first_row, last_row):
    """Write rows ``first_row``..``last_row`` (1-based) of a PNG to target.

    Returns the cropped image's info. Rows below ``last_row`` are never
    decompressed.
    """
    rows = iter_png_rows(source)
    info, extra = next(rows)
    if not 1 <= first_row <= last_row <= info.height:
        raise ImageError("rows %d-%d are outside the image's %d rows"
                         % (first_row, last_row, info.height))
    cropped = info._replace(height=last_row - first_row + 1)

    def wanted_rows():
        for number, row in enumerate(rows, 1):
            if number > last_row:
                break
            if number >= first_row:
                yield 0, row

    write_png(target, cropped, wanted_rows(), extra)
    rows.close()
    return cropped


def first_row_filter(filter_type, line, pixel_bytes):
    """Re-filter a slice's first row so it no longer uses the row above.

    In the slice's own PNG the row above was all zeros. With a zero row
    above, Up is the same as None and Paeth the same as Sub, and Average
    has to be undone.
    """
    if filter_type == 2:
        return 0, line
    if filter_type == 4:
        return 1, line
    if filter_type == 3:
        return 0, unfilter_row(3, line, bytes(len(line)), pixel_bytes)
    return filter_type, line


def stitch_pngs(target, slice_paths, width, height):
    """Stack the PNGs of a frame's slices, top to bottom, into one PNG.

    Each slice contains exactly its own rows. All slices must share width,
    depth and colour type, and their heights must add up to ``height``.
    Memory is bounded by one zlib buffer, whatever the image size.
    """
    infos = []
    extras = []
    for path in slice_paths:
        info, extra, scanlines = read_png_scanlines(path)
        scanlines.close()
        infos.append(info)
        extras.append(extra)
    first = infos[0]
    for path, info in zip(slice_paths, infos):
        if (info.width, info.depth, info.color_type) != \
                (width, first.depth, first.color_type):
            raise ImageError("slice %s is %s, expected width %d like %s"
                             % (os.path.basename(path), info.describe(),
                                width, first.describe()))
    total = sum(info.height for info in infos)
    if total != height:
        raise ImageError("slices hold %d rows, the frame has %d"
                         % (total, height))

    def all_scanlines():
        for path in slice_paths:
            for scanline in slice_scanlines(path, first.pixel_bytes):
                yield scanline

    write_png(target, first._replace(height=height), all_scanlines(),
              extras[0])


def slice_scanlines(path, pixel_bytes):
    """Yield a slice PNG's scanlines, its first row re-filtered so that
    it no longer refers to the row above (see first_row_filter)."""
    _, _, scanlines = read_png_scanlines(path)
    for number, (filter_type, line) in enumerate(scanlines):
        if number == 0:
            filter_type, line = first_row_filter(filter_type, line,
                                                 pixel_bytes)
        yield filter_type, line


def write_partial_frame(target, parts, width):
    """Stack the slices that have arrived, with black rows for the rest.

    ``parts`` lists (slice path or None, row count) from the top. At
    least one part must have a path. Used for the live preview of a
    frame in progress.
    """
    paths = [path for path, _ in parts if path]
    info, extra, scanlines = read_png_scanlines(paths[0])
    scanlines.close()
    if info.width != width:
        raise ImageError("slice is %d pixels wide, the frame %d"
                         % (info.width, width))
    blank = bytes(info.row_bytes)

    def all_scanlines():
        for path, rows in parts:
            if path is None:
                for _ in range(rows):
                    yield 0, blank
            else:
                for scanline in slice_scanlines(path, info.pixel_bytes):
                    yield scanline

    height = sum(rows for _, rows in parts)
    write_png(target, info._replace(height=height), all_scanlines(), extra)


def read_ppm_header(stream):
    """Read a binary PPM (P6) or PGM (P5) header; return its ImageInfo.

    POV-Ray writes PGM for grey output. The header is ``P6`` or ``P5``,
    then width, height and maxval separated by
    white space, with ``#`` comments allowed between them, then exactly
    one white-space byte before the pixels.
    """
    magic = stream.read(2)
    if magic not in (b"P6", b"P5"):
        raise ImageError("not a binary PPM or PGM file (P6 or P5)")
    fields = []
    byte = stream.read(1)
    while len(fields) < 3:
        if not byte:
            raise ImageError("PPM header is truncated")
        if stream.tell() > MAX_PPM_HEADER_BYTES:
            raise ImageError("PPM header is longer than %d bytes"
                             % MAX_PPM_HEADER_BYTES)
        if byte == b"#":
            while byte not in (b"\n", b"\r", b""):
                byte = stream.read(1)
        elif byte.isspace():
            byte = stream.read(1)
        elif byte.isdigit():
            digits = b""
            while byte.isdigit():
                digits += byte
                byte = stream.read(1)
                if len(digits) > 10:
                    raise ImageError("PPM header number is too long")
            fields.append(int(digits))
        else:
            raise ImageError("PPM header has an invalid byte %r" % byte)
    if not byte.isspace():
        raise ImageError("PPM header does not end in white space")
    width, height, maxval = fields
    if maxval not in (255, 65535):
        raise ImageError("PPM maxval %d is not supported (255 or 65535)"
                         % maxval)
    if not (1 <= width <= MAX_IMAGE_SIDE and 1 <= height <= MAX_IMAGE_SIDE):
        raise ImageError("PPM size %dx%d is out of range" % (width, height))
    return ImageInfo(width, height, 8 if maxval == 255 else 16,
                     2 if magic == b"P6" else 0)


def write_apng(target, frame_paths, delay_ms=DEFAULT_FRAME_DELAY_MS):
    """Write an animated PNG of frames that share one size and format.

    Each frame's compressed image data is copied as it is (IDAT for the
    first frame, fdAT for the others), so nothing is decoded and memory
    stays bounded. Viewers without APNG support show the first frame.
    """
    first, extra, scanlines = read_png_scanlines(frame_paths[0])
    scanlines.close()
    with atomic_output(target, ".png") as out:
        write_png_head(out, first, extra)
        out.write(png_chunk(b"acTL", struct.pack(">II", len(frame_paths),
                                                 0)))
        sequence = 0
        for index, path in enumerate(frame_paths):
            with open(path, "rb") as stream:
                chunks = iter_png_chunks(stream)
                info = parse_ihdr(next(chunks)[1])
                if info != first:
                    raise ImageError("frame %s is %s, the first is %s"
                                     % (os.path.basename(path),
                                        info.describe(), first.describe()))
                out.write(png_chunk(b"fcTL", struct.pack(
                    ">IIIIIHHBB", sequence, first.width, first.height, 0, 0,
                    delay_ms, 1000, 0, 0)))
                sequence += 1
                for kind, data in chunks:
                    if kind != b"IDAT":
                        continue
                    if index == 0:
                        out.write(png_chunk(b"IDAT", data))
                    else:
                        out.write(png_chunk(
                            b"fdAT", struct.pack(">I", sequence) + data))
                        sequence += 1
        out.write(png_chunk(b"IEND", b""))


def encode_mp4(ffmpeg, frame_paths, target, folder,
               fps=MP4_FRAMES_PER_SECOND):
    """Encode frames into an H.264 MP4 with ffmpeg.

    The frames are linked into ``folder`` under numbered names, the
    pattern ffmpeg reads. Odd sizes are padded to even ones, which
    yuv420p, the format every player shows, needs.
    """
    for index, path in enumerate(frame_paths):
        name = os.path.join(folder, "%08d.png" % index)
        try:
            os.link(path, name)
        except OSError:
            shutil.copyfile(path, name)
    command = [ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error",
               "-y", "-framerate", str(fps), "-i",
               os.path.join(folder, "%08d.png"), "-vf",
               "pad=ceil(iw/2)*2:ceil(ih/2)*2", "-pix_fmt", "yuv420p",
               "-movflags", "+faststart", "-f", "mp4", target]
    try:
        result = subprocess.run(command, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE,
                                timeout=MAX_ENCODE_SECONDS)
    except subprocess.TimeoutExpired:
        raise HelperFailed("ffmpeg took longer than %d s; download "
                           "animation.png instead" % MAX_ENCODE_SECONDS)
    except OSError as error:
        raise HelperFailed("cannot run ffmpeg (%s)" % error)
    if result.returncode != 0:
        message = result.stderr.decode("utf-8", "replace").strip()
        raise HelperFailed("ffmpeg failed with exit code %d: %s"
                           % (result.returncode, printable(message[-500:])))


def ppm_to_png(source, target, first_row=1, last_row=None):
    """Convert rows ``first_row``..``last_row`` of a PPM file to a PNG."""
    with open(source, "rb") as stream:
        info = read_ppm_header(stream)
        last_row = info.height if last_row is None else last_row
        if not 1 <= first_row <= last_row <= info.height:
            raise ImageError("rows %d-%d are outside the image's %d rows"
                             % (first_row, last_row, info.height))
        stream.seek((first_row - 1) * info.row_bytes, io.SEEK_CUR)
        cropped = info._replace(height=last_row - first_row + 1)

        def rows():
            for number in range(cropped.height):
                row = stream.read(info.row_bytes)
                if len(row) != info.row_bytes:
                    raise ImageError("PPM pixel data is truncated at row "
                                     "%d" % (first_row + number))
                yield 0, row

        write_png(target, cropped, rows())
    return cropped


# ===========================================================================
# 5. Storage: the SQLite schema and every query
# ===========================================================================

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    state TEXT NOT NULL,            -- queued running paused done failed
                                    -- cancelled
    priority INTEGER NOT NULL DEFAULT 0,
    max_workers INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL,
    archive TEXT NOT NULL,          -- SHA-256 of the job archive
    root TEXT NOT NULL,             -- job folder inside the archive
    ini TEXT,
    settings TEXT NOT NULL,         -- JSON, see resolve_settings()
    povray_options TEXT NOT NULL,   -- JSON list of submit options
    first_frame INTEGER NOT NULL,
    last_frame INTEGER NOT NULL,
    row_ranges TEXT NOT NULL,       -- JSON list of [first, last] rows
    task_count INTEGER NOT NULL,
    tasks_done INTEGER NOT NULL DEFAULT 0,
    frame_count INTEGER NOT NULL,
    frames_done INTEGER NOT NULL DEFAULT 0,
    adaptive INTEGER NOT NULL DEFAULT 0,    -- merge frames into tasks
    render_seconds REAL NOT NULL DEFAULT 0, -- of accepted whole frames
    frames_rendered INTEGER NOT NULL DEFAULT 0,
    slice_seconds REAL NOT NULL DEFAULT 0,  -- of accepted slices
    rows_rendered INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    created REAL NOT NULL,
    started REAL,
    finished REAL
);
CREATE TABLE IF NOT EXISTS tasks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    frame_first INTEGER NOT NULL,
    frame_last INTEGER NOT NULL,
    row_first INTEGER NOT NULL,
    row_last INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'queued',   -- queued leased done failed
    attempts INTEGER NOT NULL DEFAULT 0,
    attempt TEXT,                   -- id of the current or accepted attempt
    expired_attempt TEXT,           -- attempt whose lease ran out, until
                                    -- another attempt is issued
    worker_id INTEGER,
    lease_until REAL,               -- server clock, seconds since epoch
    progress REAL NOT NULL DEFAULT 0,
    failed_worker INTEGER,          -- worker whose attempt failed last
    started REAL,
    finished REAL,
    error TEXT,
    log TEXT
);
CREATE INDEX IF NOT EXISTS tasks_queue ON tasks (job_id, state, seq);
CREATE INDEX IF NOT EXISTS tasks_lease ON tasks (state, lease_until);
CREATE INDEX IF NOT EXISTS tasks_frame ON tasks (job_id, frame_first);
CREATE TABLE IF NOT EXISTS frames (
    job_id INTEGER NOT NULL,
    frame INTEGER NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, frame)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS worker_job_failures (
    worker_id INTEGER NOT NULL,
    job_id INTEGER NOT NULL,
    failures INTEGER NOT NULL,
    last_failure REAL NOT NULL,
    PRIMARY KEY (worker_id, job_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS workers (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    grp TEXT NOT NULL,
    host TEXT NOT NULL,
    registered REAL NOT NULL,
    last_seen REAL NOT NULL,
    task_id INTEGER,
    tasks_done INTEGER NOT NULL DEFAULT 0,
    render_seconds REAL NOT NULL DEFAULT 0
);
-- HTTPov 0.9 clients: each "hostname:cid" is one worker, and each batch
-- number they are given stands for one attempt of one task.
CREATE TABLE IF NOT EXISTS legacy_clients (
    client TEXT PRIMARY KEY,
    worker_id INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS legacy_batches (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id INTEGER NOT NULL,
    attempt TEXT NOT NULL,
    worker_id INTEGER NOT NULL,
    created REAL NOT NULL
);
"""

ACTIVE_JOB_STATES = ("queued", "running")
FINAL_JOB_STATES = ("done", "failed", "cancelled")


class DatabaseBusy(Exception):
    """The database stayed locked longer than SQLITE_BUSY_SECONDS."""


class Database:
    """The server's SQLite database; the only place that runs SQL.

    Each thread gets its own connection. Writes run in ``BEGIN
    IMMEDIATE`` transactions, so two claims never pick the same task.
    """

    def __init__(self, path, busy_seconds=SQLITE_BUSY_SECONDS,
                 lease_seconds=DEFAULT_LEASE_SECONDS,
                 target_task_seconds=DEFAULT_TARGET_TASK_SECONDS):
        import sqlite3     # imported here: workers must run without it
        self.sqlite3 = sqlite3
        self.path = path
        self.busy_seconds = busy_seconds
        self.lease_seconds = lease_seconds
        self.target_task_seconds = target_task_seconds
        # Writers queue here instead of in SQLite's busy handler, which
        # sleeps up to 100 ms between tries and so wastes most of the
        # time under contention. One process owns the data folder.
        self.write_lock = threading.Lock()
        self.local = threading.local()
        connection = self.connection()
        connection.executescript(SCHEMA)
        check = connection.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise RuntimeError("database %s failed its integrity check: %s"
                               % (path, check))
        connection.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', ?)",
            (str(SCHEMA_VERSION),))

    def connection(self):
        connection = getattr(self.local, "connection", None)
        if connection is None:
            connection = self.sqlite3.connect(
                self.path, timeout=self.busy_seconds,
                isolation_level=None)
            connection.row_factory = self.sqlite3.Row
            connection.execute("PRAGMA journal_mode=WAL")
            # NORMAL keeps the database consistent after any crash. A power
            # cut may roll back the last commits, so their tasks are then
            # rendered again, but never lost or accepted twice.
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.execute("PRAGMA foreign_keys=ON")
            self.local.connection = connection
        return connection

    def transaction(self):
        return Transaction(self)

    def query(self, sql, parameters=()):
        try:
            return self.connection().execute(sql, parameters).fetchall()
        except self.sqlite3.OperationalError as error:
            if "locked" in str(error) or "busy" in str(error):
                raise DatabaseBusy(str(error))
            raise

    def query_one(self, sql, parameters=()):
        rows = self.query(sql, parameters)
        return rows[0] if rows else None

    # -- jobs ---------------------------------------------------------------

    def create_job(self, plan, archive_sha, max_attempts, now):
        # NOTE: the insert runs in one write transaction, so a job of
        # millions of tasks (about 13 s for 2,000,000) delays claims.
        settings = plan["settings"]
        frame_count = plan["last_frame"] - plan["first_frame"] + 1
        with self.transaction() as db:
            cursor = db.execute(
                "INSERT INTO jobs (name, state, priority, max_workers,"
                " max_attempts, archive, root, ini, settings,"
                " povray_options, first_frame, last_frame, row_ranges,"
                " task_count, frame_count, created, adaptive)"
                " VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?,"
                " ?, ?, ?, ?)",
                (plan["name"], plan["priority"], plan["max_workers"],
                 max_attempts, archive_sha, plan["root"], plan["ini"],
                 json.dumps(settings), json.dumps(plan["povray_options"]),
                 plan["first_frame"], plan["last_frame"],
                 json.dumps(plan["row_ranges"]), plan["task_count"],
                 frame_count, now,
                 int(not plan["frames_per_task"])))
            job_id = cursor.lastrowid
            tasks = plan_tasks(plan["first_frame"], plan["last_frame"],
                               plan["row_ranges"], plan["frames_per_task"])
            db.executemany(
                "INSERT INTO tasks (job_id, seq, frame_first, frame_last,"
                " row_first, row_last) VALUES (?, ?, ?, ?, ?, ?)",
                ((job_id, seq) + task for seq, task in enumerate(tasks)))
            db.executemany(
                "INSERT INTO frames (job_id, frame) VALUES (?, ?)",
                ((job_id, frame) for frame in
                 range(plan["first_frame"], plan["last_frame"] + 1)))
        return job_id

    def job(self, job_id):
        row = self.query_one("SELECT * FROM jobs WHERE id = ?", (job_id,))
        if row is None:
            raise NotFound("job %s not found" % job_id)
        return row

    def jobs(self):
        return self.query("SELECT * FROM jobs ORDER BY id")

    def task_counts(self, job_id):
        """Return the number of a job's tasks in each state, and under
        "rows_done" the frame rows that its done tasks rendered."""
        rows = self.query(
            "SELECT state, COUNT(*) AS n, SUM((frame_last - frame_first"
            " + 1) * (row_last - row_first + 1)) AS frame_rows FROM tasks"
            " WHERE job_id = ? GROUP BY state", (job_id,))
        counts = {"queued": 0, "leased": 0, "done": 0, "failed": 0,
                  "rows_done": 0}
        for row in rows:
            counts[row["state"]] = row["n"]
            if row["state"] == "done":
                counts["rows_done"] = row["frame_rows"]
        return counts

    def tasks(self, job_id, states=None, limit=1000):
        if states:
            marks = ",".join("?" * len(states))
            return self.query(
                "SELECT * FROM tasks WHERE job_id = ? AND state IN (%s)"
                " ORDER BY seq LIMIT ?" % marks,
                (job_id,) + tuple(states) + (limit,))
        return self.query("SELECT * FROM tasks WHERE job_id = ?"
                          " ORDER BY seq LIMIT ?", (job_id, limit))

    def task(self, task_id):
        row = self.query_one("SELECT * FROM tasks WHERE id = ?", (task_id,))
        if row is None:
            raise NotFound("task %s not found" % task_id)
        return row

    def done_frames(self, job_id):
        return [row["frame"] for row in self.query(
            "SELECT frame FROM frames WHERE job_id = ? AND done = 1"
            " ORDER BY frame", (job_id,))]

    def frame_done(self, job_id, frame):
        row = self.query_one("SELECT done FROM frames WHERE job_id = ?"
                             " AND frame = ?", (job_id, frame))
        return bool(row and row["done"])

    def archive_in_use(self, archive_sha):
        return self.query_one("SELECT 1 FROM jobs WHERE archive = ?",
                              (archive_sha,)) is not None

    def update_job(self, job_id, priority=None, max_workers=None):
        with self.transaction() as db:
            self._job_for_update(db, job_id)
            if priority is not None:
                db.execute("UPDATE jobs SET priority = ? WHERE id = ?",
                           (priority, job_id))
            if max_workers is not None:
                db.execute("UPDATE jobs SET max_workers = ? WHERE id = ?",
                           (max_workers, job_id))

    def _job_for_update(self, db, job_id):
        row = db.execute("SELECT * FROM jobs WHERE id = ?",
                         (job_id,)).fetchone()
        if row is None:
            raise NotFound("job %s not found" % job_id)
        return row

    def control_job(self, job_id, action, now):
        """Apply pause, resume, cancel or retry; return the new state."""
        with self.transaction() as db:
            job = self._job_for_update(db, job_id)
            state = job["state"]
            if action == "pause":
                if state not in ACTIVE_JOB_STATES:
                    raise Conflict("job %d is %s and cannot be paused"
                                   % (job_id, state))
                state = "paused"
            elif action == "resume":
                if state != "paused":
                    raise Conflict("job %d is %s, not paused"
                                   % (job_id, state))
                state = "running" if job["started"] else "queued"
            elif action == "cancel":
                if state in FINAL_JOB_STATES:
                    raise Conflict("job %d is already %s" % (job_id, state))
                # Leased tasks keep their lease. The next heartbeat
                # returns "stop", and the worker releases the task.
                state = "cancelled"
            elif action == "retry":
                if state not in ("failed", "cancelled") and \
                        not self._has_failed_tasks(db, job_id):
                    raise Conflict("job %d is %s and has no failed tasks"
                                   % (job_id, state))
                db.execute("UPDATE tasks SET state = 'queued', attempts = 0,"
                           " attempt = NULL, error = NULL"
                           " WHERE job_id = ? AND state = 'failed'",
                           (job_id,))
                state = "running" if job["started"] else "queued"
                db.execute("UPDATE jobs SET error = NULL, finished = NULL"
                           " WHERE id = ?", (job_id,))
            else:
                raise UserError("unknown job action %r: expected pause, "
                                "resume, cancel, retry or delete" % action)
            if state in FINAL_JOB_STATES:
                db.execute("UPDATE jobs SET state = ?, finished = ?"
                           " WHERE id = ?", (state, now, job_id))
            else:
                db.execute("UPDATE jobs SET state = ? WHERE id = ?",
                           (state, job_id))
        return state

    def _has_failed_tasks(self, db, job_id):
        return db.execute("SELECT 1 FROM tasks WHERE job_id = ? AND"
                          " state = 'failed' LIMIT 1",
                          (job_id,)).fetchone() is not None

    def delete_job(self, job_id):
        with self.transaction() as db:
            job = self._job_for_update(db, job_id)
            db.execute("DELETE FROM tasks WHERE job_id = ?", (job_id,))
            db.execute("DELETE FROM frames WHERE job_id = ?", (job_id,))
            db.execute("DELETE FROM worker_job_failures WHERE job_id = ?",
                       (job_id,))
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        return job

    # -- workers ------------------------------------------------------------

    def register_worker(self, name, group, host, now):
        with self.transaction() as db:
            cursor = db.execute(
                "INSERT INTO workers (name, grp, host, registered,"
                " last_seen) VALUES (?, ?, ?, ?, ?)",
                (name, group, host, now, now))
            return cursor.lastrowid

    def worker(self, worker_id):
        row = self.query_one("SELECT * FROM workers WHERE id = ?",
                             (worker_id,))
        if row is None:
            raise NotFound("worker %s not found; register again"
                           % worker_id)
        return row

    def workers(self):
        return self.query("SELECT * FROM workers ORDER BY id")

    # -- the task life cycle ------------------------------------------------

    def expire_leases(self, now):
        """Put tasks whose lease ran out back in the queue.

        Returns the (task id, job id, worker id) of each expired lease.
        A lease that expires counts as a failed attempt.
        """
        with self.transaction() as db:
            rows = db.execute(
                "SELECT id, job_id, worker_id FROM tasks"
                " WHERE state = 'leased' AND lease_until < ?",
                (now,)).fetchall()
            for row in rows:
                attempt = db.execute("SELECT attempt FROM tasks WHERE"
                                     " id = ?", (row["id"],)).fetchone()[0]
                self._end_attempt(db, row["id"], "lease expired (worker %s "
                                  "stopped sending heartbeats)"
                                  % row["worker_id"], None, now)
                db.execute("UPDATE tasks SET expired_attempt = ? WHERE"
                           " id = ? AND state = 'queued'",
                           (attempt, row["id"]))
        return [(row["id"], row["job_id"], row["worker_id"])
                for row in rows]

    def extend_leases(self, until):
        """Give every running lease time until ``until`` (after restart)."""
        with self.transaction() as db:
            db.execute("UPDATE tasks SET lease_until = ?"
                       " WHERE state = 'leased' AND lease_until < ?",
                       (until, until))

    def _claimable(self, db, worker_id, now, accept_job):
        """Yield (job, next task, workers on the job) that a worker may
        take, best first.

        Jobs are tried by priority, highest first, then the job with the
        fewest workers on it, then the oldest. A job whose max_workers
        is reached, or that ``accept_job`` refuses, is skipped. Within a
        job, tasks go in order, but a task that failed on this worker
        goes to other workers first.
        """
        busy = dict(db.execute(
            "SELECT job_id, COUNT(DISTINCT worker_id) FROM tasks"
            " WHERE state = 'leased' GROUP BY job_id").fetchall())
        jobs = db.execute(
            "SELECT * FROM jobs WHERE state IN ('queued', 'running')"
            " ORDER BY priority DESC, id").fetchall()
        jobs.sort(key=lambda job: (-job["priority"],
                                   busy.get(job["id"], 0), job["id"]))
        kept_away = {row[0] for row in db.execute(
            "SELECT job_id FROM worker_job_failures WHERE worker_id = ?"
            " AND failures >= ? AND last_failure > ?",
            (worker_id, WORKER_JOB_FAILURE_LIMIT,
             now - WORKER_JOB_COOLDOWN_SECONDS))}
        for job in jobs:
            if job["id"] in kept_away or not accept_job(job):
                continue
            if job["max_workers"] and \
                    busy.get(job["id"], 0) >= job["max_workers"]:
                continue
            task = db.execute(
                "SELECT * FROM tasks WHERE job_id = ? AND"
                " state = 'queued' AND (failed_worker IS NULL OR"
                " failed_worker != ?) ORDER BY seq LIMIT 1",
                (job["id"], worker_id)).fetchone()
            if task is None:
                task = db.execute(
                    "SELECT * FROM tasks WHERE job_id = ? AND"
                    " state = 'queued' ORDER BY seq LIMIT 1",
                    (job["id"],)).fetchone()
            if task is not None:
                yield job, task, busy.get(job["id"], 0)

    def claim_task(self, worker_id, now, lease_seconds,
                   accept_job=lambda job: True):
        """Lease the next task to a worker; return (task, job) or None.

        See _claimable() for the order; ``accept_job`` narrows the jobs.
        """
        with self.transaction() as db:
            self._worker_seen(db, worker_id, now)
            db.execute("UPDATE workers SET task_id = NULL WHERE id = ?",
                       (worker_id,))
            for job, task, busy in self._claimable(db, worker_id, now,
                                                   accept_job):
                if len(json.loads(job["row_ranges"])) > 1:
                    self._merge_rows(db, job, task, busy, now)
                else:
                    self._merge_frames(db, job, task, busy, now)
                attempt = secrets.token_hex(16)
                db.execute(
                    "UPDATE tasks SET state = 'leased', attempt = ?,"
                    " expired_attempt = NULL,"
                    " attempts = attempts + 1, worker_id = ?,"
                    " lease_until = ?, progress = 0, started = ?"
                    " WHERE id = ?",
                    (attempt, worker_id, now + lease_seconds, now,
                     task["id"]))
                db.execute("UPDATE workers SET task_id = ? WHERE id = ?",
                           (task["id"], worker_id))
                if job["state"] == "queued":
                    db.execute("UPDATE jobs SET state = 'running',"
                               " started = ? WHERE id = ?", (now, job["id"]))
                task = db.execute("SELECT * FROM tasks WHERE id = ?",
                                  (task["id"],)).fetchone()
                return task, job
        return None

    def claimable_job(self, worker_id, now, accept_job):
        """Return the job whose task the worker would claim next, or
        None; nothing is leased."""
        with self.transaction() as db:
            self._worker_seen(db, worker_id, now)
            for job, _, _ in self._claimable(db, worker_id, now,
                                             accept_job):
                return job
        return None

    def legacy_worker(self, client, group, host, now):
        """Return the worker id of an HTTPov 0.9 client, registering it
        the first time its "hostname:cid" is seen."""
        with self.transaction() as db:
            row = db.execute("SELECT worker_id FROM legacy_clients WHERE"
                             " client = ?", (client,)).fetchone()
            if row is not None:
                db.execute("UPDATE workers SET grp = ?, host = ?,"
                           " last_seen = ? WHERE id = ?",
                           (group, host, now, row[0]))
                return row[0]
            worker_id = db.execute(
                "INSERT INTO workers (name, grp, host, registered,"
                " last_seen) VALUES (?, ?, ?, ?, ?)",
                (client, group, host, now, now)).lastrowid
            db.execute("INSERT INTO legacy_clients (client, worker_id)"
                       " VALUES (?, ?)", (client, worker_id))
            return worker_id

    def add_legacy_batch(self, task_id, attempt, worker_id, now):
        """Number an attempt for an HTTPov 0.9 client; return the number."""
        with self.transaction() as db:
            return db.execute(
                "INSERT INTO legacy_batches (task_id, attempt, worker_id,"
                " created) VALUES (?, ?, ?, ?)",
                (task_id, attempt, worker_id, now)).lastrowid

    def legacy_batch(self, batch_id):
        row = self.query_one("SELECT * FROM legacy_batches WHERE id = ?",
                             (batch_id,))
        if row is None:
            raise NotFound("batch %s not found" % batch_id)
        return row

    def _merge_frames(self, db, job, task, busy, now):
        """Grow an adaptive job's task toward the target duration.

        The task takes over the queued one-frame tasks that follow it,
        as many as the measured seconds per frame allow. It takes no
        more than a share of what is left, so that the last tasks of a
        job stay short and every worker gets some.
        """
        if not job["adaptive"] or not job["frames_rendered"] or \
                task["attempts"] or task["frame_first"] != task["frame_last"]:
            return
        per_frame = job["render_seconds"] / job["frames_rendered"]
        wanted = int(self.target_task_seconds / max(per_frame, 0.001))
        count = min(wanted, self._fair_share(db, job, busy, now),
                    MAX_MERGED_FRAMES)
        if count < 2:
            return
        following = db.execute(
            "SELECT id, frame_first FROM tasks WHERE job_id = ? AND"
            " frame_first > ? AND frame_first <= ? AND state = 'queued'"
            " AND attempts = 0 AND frame_last = frame_first"
            " ORDER BY frame_first",
            (job["id"], task["frame_first"],
             task["frame_first"] + count - 1)).fetchall()
        merged = []
        for row in following:
            if row["frame_first"] != task["frame_first"] + len(merged) + 1:
                break
            merged.append(row["id"])
        if merged:
            self._absorb_tasks(db, job, task, merged, "frame_last",
                               task["frame_first"] + len(merged))

    def _fair_share(self, db, job, busy, now):
        """Return how many queued tasks of a job one task may take over."""
        workers = db.execute("SELECT COUNT(*) FROM workers WHERE"
                             " last_seen > ?",
                             (now - self.lease_seconds,)).fetchone()[0]
        left = job["task_count"] - job["tasks_done"] - busy
        return left // (2 * max(workers, 1))

    def _merge_rows(self, db, job, task, busy, now):
        """Grow a sliced job's task by the queued slices below it.

        Slices keep their block-aligned start, so merged slices still
        match a full render. The measured seconds per row and the fair
        share bound the merge as for frames.
        """
        if not job["adaptive"] or not job["rows_rendered"] or \
                task["attempts"]:
            return
        per_row = job["slice_seconds"] / job["rows_rendered"]
        wanted_rows = int(self.target_task_seconds / max(per_row, 1e-6))
        share = self._fair_share(db, job, busy, now)
        following = db.execute(
            "SELECT id, row_first, row_last FROM tasks WHERE job_id = ?"
            " AND frame_first = ? AND row_first > ? AND state = 'queued'"
            " AND attempts = 0 ORDER BY row_first",
            (job["id"], task["frame_first"], task["row_last"])).fetchall()
        merged = []
        row_last = task["row_last"]
        for row in following:
            if row["row_first"] != row_last + 1 or len(merged) >= share or \
                    row["row_last"] - task["row_first"] + 1 > wanted_rows:
                break
            merged.append(row["id"])
            row_last = row["row_last"]
        if merged:
            self._absorb_tasks(db, job, task, merged, "row_last", row_last)

    def _absorb_tasks(self, db, job, task, merged, column, last):
        """Delete the merged tasks and extend ``task`` to cover them."""
        assert column in ("frame_last", "row_last")
        db.executemany("DELETE FROM tasks WHERE id = ?",
                       [(task_id,) for task_id in merged])
        db.execute("UPDATE tasks SET %s = ? WHERE id = ?" % column,
                   (last, task["id"]))
        db.execute("UPDATE jobs SET task_count = task_count - ?"
                   " WHERE id = ?", (len(merged), job["id"]))

    def _worker_seen(self, db, worker_id, now):
        cursor = db.execute("UPDATE workers SET last_seen = ? WHERE id = ?",
                            (now, worker_id))
        if cursor.rowcount == 0:
            raise NotFound("worker %s not found; register again"
                           % worker_id)

    def _current_task(self, db, task_id, attempt):
        """Return the task if ``attempt`` holds its lease, else raise."""
        task = db.execute("SELECT * FROM tasks WHERE id = ?",
                          (task_id,)).fetchone()
        if task is None:
            raise Conflict("task %s no longer exists (its job was "
                           "deleted)" % task_id)
        if task["state"] == "queued" and attempt and \
                task["expired_attempt"] == attempt:
            # The lease ran out but no other attempt was issued, as when a
            # worker kept its result through a long server outage. Taking
            # the attempt back loses nothing and saves a render.
            db.execute("UPDATE tasks SET state = 'leased', attempt = ?,"
                       " expired_attempt = NULL, worker_id = failed_worker,"
                       " lease_until = ? WHERE id = ?",
                       (attempt, time.time() + self.lease_seconds, task_id))
            task = db.execute("SELECT * FROM tasks WHERE id = ?",
                              (task_id,)).fetchone()
        if task["state"] != "leased" or task["attempt"] != attempt:
            raise Conflict("attempt %s of task %s is no longer current; "
                           "the task was given to another attempt"
                           % (attempt, task_id))
        return task

    def heartbeat(self, task_id, attempt, worker_id, progress, now,
                  lease_seconds):
        """Renew a lease; return "continue" or "stop" (job not active)."""
        with self.transaction() as db:
            task = self._current_task(db, task_id, attempt)
            self._worker_seen(db, worker_id, now)
            db.execute("UPDATE tasks SET lease_until = ?, progress = ?"
                       " WHERE id = ?",
                       (now + lease_seconds, progress, task_id))
            job = db.execute("SELECT state FROM jobs WHERE id = ?",
                             (task["job_id"],)).fetchone()
            if job["state"] in ACTIVE_JOB_STATES + ("paused",):
                return "continue"
            return "stop"

    def accepted_attempt(self, task_id, attempt):
        """Tell whether ``attempt`` is the accepted result of a task."""
        row = self.query_one("SELECT state, attempt FROM tasks"
                             " WHERE id = ?", (task_id,))
        return bool(row and row["state"] == "done" and
                    row["attempt"] == attempt)

    def leased_task(self, task_id, attempt):
        """Return (task, job) while ``attempt`` holds the lease.

        A task of a cancelled job goes back to the queue at once, so
        that a later retry does not wait for its lease to run out.
        """
        task = self.query_one("SELECT * FROM tasks WHERE id = ?",
                              (task_id,))
        job = task and self.query_one("SELECT * FROM jobs WHERE id = ?",
                                      (task["job_id"],))
        if job and task["state"] == "leased" and \
                task["attempt"] == attempt and \
                job["state"] in ACTIVE_JOB_STATES + ("paused",):
            # The common case needs no write transaction.
            return task, job
        with self.transaction() as db:
            task = self._current_task(db, task_id, attempt)
            job = db.execute("SELECT * FROM jobs WHERE id = ?",
                             (task["job_id"],)).fetchone()
            if job["state"] not in ACTIVE_JOB_STATES + ("paused",):
                self._requeue(db, task)
        if job["state"] not in ACTIVE_JOB_STATES + ("paused",):
            raise Conflict("job %d is %s; the result is not needed"
                           % (job["id"], job["state"]))
        return task, job

    def accept_result(self, task_id, attempt, log_text, now, place_files):
        """Mark an attempt's result done, calling place_files() first.

        ``place_files`` renames the checked result files into place. It
        runs inside the write transaction, after the attempt was found
        current, so an accepted result is never overwritten. Returns the
        frames whose every task is now done.
        """
        with self.transaction() as db:
            task = self._current_task(db, task_id, attempt)
            job = db.execute("SELECT * FROM jobs WHERE id = ?",
                             (task["job_id"],)).fetchone()
            if job["state"] not in ACTIVE_JOB_STATES + ("paused",):
                raise Conflict("job %d is %s; the result is not needed"
                               % (job["id"], job["state"]))
            place_files()
            seconds = now - (task["started"] or now)
            db.execute("UPDATE tasks SET state = 'done', finished = ?,"
                       " lease_until = NULL, progress = 1, log = ?,"
                       " error = NULL WHERE id = ?",
                       (now, log_text, task_id))
            db.execute("UPDATE workers SET tasks_done = tasks_done + 1,"
                       " render_seconds = render_seconds + ?,"
                       " task_id = NULL WHERE id = ?",
                       (seconds, task["worker_id"]))
            db.execute("UPDATE jobs SET tasks_done = tasks_done + 1"
                       " WHERE id = ?", (job["id"],))
            if task["row_first"] == 1 and task["row_last"] == \
                    json.loads(job["settings"])["height"]:
                db.execute("UPDATE jobs SET render_seconds = render_seconds"
                           " + ?, frames_rendered = frames_rendered + ?"
                           " WHERE id = ?",
                           (seconds, task["frame_last"] -
                            task["frame_first"] + 1, job["id"]))
            else:
                db.execute("UPDATE jobs SET slice_seconds = slice_seconds"
                           " + ?, rows_rendered = rows_rendered + ?"
                           " WHERE id = ?",
                           (seconds, task["row_last"] - task["row_first"] +
                            1, job["id"]))
            frames = list(range(task["frame_first"], task["frame_last"] + 1))
            if len(json.loads(job["row_ranges"])) == 1:
                # Whole frames are final as they are: record them in the
                # same transaction, so no crash can leave them unrecorded.
                if self._record_frames(db, job["id"], frames, now):
                    server_log.info("job %d: done", job["id"])
                return []
            # A slice task covers one frame, found by frame_first alone.
            left = db.execute(
                "SELECT COUNT(*) FROM tasks WHERE job_id = ? AND"
                " frame_first = ? AND state != 'done'",
                (job["id"], task["frame_first"])).fetchone()[0]
        return frames if left == 0 else []

    def mark_frames_done(self, job_id, frames, now):
        """Record frames whose final PNG is in place; finish the job.

        Returns True when this finished the job.
        """
        with self.transaction() as db:
            return self._record_frames(db, job_id, frames, now)

    def _record_frames(self, db, job_id, frames, now):
        for frame in frames:
            cursor = db.execute(
                "UPDATE frames SET done = 1 WHERE job_id = ? AND"
                " frame = ? AND done = 0", (job_id, frame))
            db.execute("UPDATE jobs SET frames_done = frames_done + ?"
                       " WHERE id = ?", (cursor.rowcount, job_id))
        job = db.execute("SELECT * FROM jobs WHERE id = ?",
                         (job_id,)).fetchone()
        if job and job["frames_done"] == job["frame_count"] and \
                job["state"] not in FINAL_JOB_STATES:
            db.execute("UPDATE jobs SET state = 'done', finished = ?"
                       " WHERE id = ?", (now, job_id))
            return True
        return False

    def frame_slices(self, job_id, frame):
        """Return (task id, first row, last row, state) of a frame's
        slice tasks, top slice first."""
        return self.query(
            "SELECT id, row_first, row_last, state FROM tasks WHERE"
            " job_id = ? AND frame_first = ? ORDER BY row_first",
            (job_id, frame))

    def preview_frame(self, job_id):
        """Return the first frame that is being rendered in slices and
        has a finished slice, or None."""
        row = self.query_one(
            "SELECT MIN(frame_first) FROM tasks AS running WHERE"
            " job_id = ? AND state = 'leased' AND EXISTS (SELECT 1 FROM"
            " tasks AS done WHERE done.job_id = running.job_id AND"
            " done.frame_first = running.frame_first AND"
            " done.state = 'done')", (job_id,))
        return row[0]

    def frame_tasks(self, job_id, frame):
        """Return the ids of a frame's slice tasks, top slice first."""
        return [row["id"] for row in self.query(
            "SELECT id FROM tasks WHERE job_id = ? AND frame_first = ?"
            " ORDER BY row_first", (job_id, frame))]

    def fail_job(self, job_id, message, now):
        with self.transaction() as db:
            db.execute("UPDATE jobs SET state = 'failed', error = ?,"
                       " finished = ? WHERE id = ?",
                       (message, now, job_id))

    def unstitched_frames(self):
        """Return (job id, frame) of frames whose tasks are all done but
        whose final PNG was not recorded, as after a crash mid-stitch."""
        # Only sliced frames are stitched after their tasks are done, and a
        # slice task covers exactly one frame.
        return [(row["job_id"], row["frame"]) for row in self.query(
            "SELECT t.job_id, t.frame_first AS frame FROM tasks t"
            " JOIN frames f ON f.job_id = t.job_id AND f.frame ="
            " t.frame_first JOIN jobs j ON j.id = t.job_id"
            " WHERE f.done = 0 AND j.state != 'cancelled'"
            " AND t.frame_first = t.frame_last"
            " GROUP BY t.job_id, t.frame_first"
            " HAVING SUM(t.state != 'done') = 0")]

    def fail_task(self, task_id, attempt, error, log_text, now):
        """Record a failed attempt; return True if the job failed."""
        with self.transaction() as db:
            task = self._current_task(db, task_id, attempt)
            self._count_worker_failure(db, task["worker_id"],
                                       task["job_id"], now)
            return self._end_attempt(db, task_id, error, log_text, now)

    def _count_worker_failure(self, db, worker_id, job_id, now):
        """Count a worker's failure on a job; old failures are forgotten."""
        db.execute("INSERT OR IGNORE INTO worker_job_failures (worker_id,"
                   " job_id, failures, last_failure) VALUES (?, ?, 0, ?)",
                   (worker_id, job_id, now))
        db.execute("UPDATE worker_job_failures SET failures = CASE WHEN"
                   " last_failure < ? THEN 1 ELSE failures + 1 END,"
                   " last_failure = ? WHERE worker_id = ? AND job_id = ?",
                   (now - WORKER_JOB_COOLDOWN_SECONDS, now, worker_id,
                    job_id))

    def release_task(self, task_id, attempt):
        """Give a task back without counting the attempt."""
        with self.transaction() as db:
            self._requeue(db, self._current_task(db, task_id, attempt))

    def _requeue(self, db, task):
        db.execute("UPDATE tasks SET state = 'queued', attempt = NULL,"
                   " expired_attempt = NULL,"
                   " attempts = MAX(attempts - 1, 0), worker_id = NULL,"
                   " lease_until = NULL, progress = 0 WHERE id = ?",
                   (task["id"],))
        db.execute("UPDATE workers SET task_id = NULL WHERE id = ?",
                   (task["worker_id"],))

    def _end_attempt(self, db, task_id, error, log_text, now):
        task = db.execute("SELECT * FROM tasks WHERE id = ?",
                          (task_id,)).fetchone()
        job = db.execute("SELECT * FROM jobs WHERE id = ?",
                         (task["job_id"],)).fetchone()
        db.execute("UPDATE workers SET task_id = NULL WHERE id = ?",
                   (task["worker_id"],))
        failed = task["attempts"] >= job["max_attempts"]
        db.execute(
            "UPDATE tasks SET state = ?, attempt = NULL, lease_until = NULL,"
            " expired_attempt = NULL,"
            " failed_worker = worker_id, worker_id = NULL, error = ?,"
            " log = COALESCE(?, log), progress = 0, finished = ?"
            " WHERE id = ?",
            ("failed" if failed else "queued", error, log_text,
             now if failed else None, task_id))
        if failed and job["state"] not in FINAL_JOB_STATES:
            message = ("task %d (frames %d-%d, rows %d-%d) failed %d times;"
                       " last error on worker %s: %s"
                       % (task_id, task["frame_first"], task["frame_last"],
                          task["row_first"], task["row_last"],
                          task["attempts"], task["worker_id"], error))
            db.execute("UPDATE jobs SET state = 'failed', error = ?,"
                       " finished = ? WHERE id = ?",
                       (message, now, job["id"]))
        return failed


class Transaction:
    """``with db.transaction() as connection:`` runs BEGIN IMMEDIATE."""

    def __init__(self, database):
        self.database = database

    def __enter__(self):
        self.connection = self.database.connection()
        lock = self.database.write_lock
        if not acquire_lock(lock, self.database.busy_seconds):
            raise DatabaseBusy("waited %.0f s for the database"
                               % self.database.busy_seconds)
        try:
            self.connection.execute("BEGIN IMMEDIATE")
        except self.database.sqlite3.OperationalError as error:
            lock.release()
            raise DatabaseBusy(str(error))
        return self.connection

    def __exit__(self, kind, value, traceback):
        try:
            if kind is None:
                try:
                    self.connection.execute("COMMIT")
                except self.database.sqlite3.OperationalError as error:
                    self.connection.execute("ROLLBACK")
                    raise DatabaseBusy(str(error))
            else:
                self.connection.execute("ROLLBACK")
        finally:
            self.database.write_lock.release()
        return False


def acquire_lock(lock, seconds):
    """Acquire a lock, waiting at most ``seconds`` (0: no wait)."""
    if seconds <= 0:
        return lock.acquire(blocking=False)
    return lock.acquire(timeout=seconds)


# ===========================================================================
# 6. HTTP server: the JSON API and the status page
# ===========================================================================

ARCHIVE_NAME = re.compile(r"^[0-9a-f]{64}$")
JOB_OPTION_NAMES = ("name", "frames", "slices", "rows_per_slice",
                    "frames_per_task", "max_workers", "priority", "scene")


class Farm:
    """The server's state and every API action, apart from HTTP."""

    def __init__(self, data_dir, lease_seconds=DEFAULT_LEASE_SECONDS,
                 max_attempts=DEFAULT_MAX_ATTEMPTS,
                 busy_seconds=SQLITE_BUSY_SECONDS,
                 max_job_bytes=MAX_JOB_BYTES,
                 max_result_bytes=MAX_RESULT_BYTES,
                 target_task_seconds=DEFAULT_TARGET_TASK_SECONDS):
        self.data_dir = os.path.abspath(data_dir)
        os.makedirs(self.data_dir, exist_ok=True)
        self.lock_file = lock_data_dir(self.data_dir)
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts
        self.max_job_bytes = int(max_job_bytes)
        self.max_result_bytes = int(max_result_bytes)
        for folder in ("archives", "frames", "slices", "tmp"):
            os.makedirs(os.path.join(self.data_dir, folder), exist_ok=True)
        for name in os.listdir(self.path("tmp")):
            remove_tree_or_file(self.path("tmp", name))
        self.tokens_path = self.path("tokens.json")
        self.tokens_stamp = None
        self.public_status = False
        self.reload_tokens()
        self.db = Database(self.path("httpov.sqlite3"), busy_seconds,
                           lease_seconds, target_task_seconds)
        self.stopping = threading.Event()
        self.encoding = threading.Lock()    # one ffmpeg run at a time
        self.legacy_networks = []           # see --legacy-clients
        self.legacy_lease_seconds = max(DEFAULT_LEGACY_LEASE_SECONDS,
                                        lease_seconds)

    def path(self, *parts):
        return os.path.join(self.data_dir, *parts)

    def reload_tokens(self):
        """Read the tokens again when ``token --rotate`` replaced them."""
        try:
            info = os.stat(self.tokens_path)
            stamp = (info.st_ino, info.st_mtime_ns)
        except OSError:
            stamp = None
        if stamp is not None and stamp == self.tokens_stamp:
            return
        self.tokens = load_or_create_tokens(self.data_dir)
        self.session = hmac.new(self.tokens["admin"].encode(), b"session",
                                hashlib.sha256).hexdigest()
        if self.tokens_stamp is not None:
            server_log.info("tokens changed on disk; old tokens no longer "
                            "work")
        info = os.stat(self.tokens_path)
        self.tokens_stamp = (info.st_ino, info.st_mtime_ns)

    def temp_path(self, suffix=""):
        handle, path = tempfile.mkstemp(dir=self.path("tmp"),
                                        suffix=suffix)
        os.close(handle)
        return path

    def frame_path(self, job_id, frame):
        return self.path("frames", str(int(job_id)), "%d.png" % int(frame))

    def slice_path(self, job_id, frame, task_id):
        return self.path("slices", str(int(job_id)), str(int(frame)),
                         "%d.png" % int(task_id))

    # -- start-up and housekeeping -----------------------------------------

    def recover(self):
        """Bring the farm back to a consistent state after a restart.

        Running leases get a grace period, so workers that kept
        rendering while the server was down can still deliver, and
        frames whose slices all arrived before a crash are stitched.
        """
        now = time.time()
        self.db.extend_leases(now + self.lease_seconds)
        for job_id, frame in self.db.unstitched_frames():
            server_log.info("job %d frame %d: finishing after restart",
                            job_id, frame)
            try:
                self.finish_frames(self.db.job(job_id), [frame])
            except (ValueError, KeyError, TypeError, OSError) as error:
                message = "finishing frame %d failed: %s" % (frame, error)
                server_log.error("job %d: %s; job failed", job_id, message)
                self.db.fail_job(job_id, message, now)

    def housekeeping(self):
        while not self.stopping.wait(HOUSEKEEPING_SECONDS):
            try:
                for task_id, job_id, worker_id in \
                        self.db.expire_leases(time.time()):
                    server_log.warning("job %d task %d: lease of worker %s "
                                       "expired, task requeued",
                                       job_id, task_id, worker_id)
            except DatabaseBusy:
                server_log.warning("housekeeping: database busy, "
                                   "trying again later")
            except Exception:
                server_log.exception("housekeeping failed")

    # -- jobs ---------------------------------------------------------------

    def submit(self, upload_path, options):
        """Check an uploaded archive and create a job; return its summary."""
        plan = prepare_job(upload_path, options,
                           UNPACKED_PER_JOB_BYTE * self.max_job_bytes)
        archive_sha = sha256_of_file(upload_path)
        target = self.path("archives", archive_sha + ".zip")
        if os.path.exists(target):
            remove_quietly(upload_path)
        else:
            os.replace(upload_path, target)
        job_id = self.db.create_job(plan, archive_sha, self.max_attempts,
                                    time.time())
        frames = plan["last_frame"] - plan["first_frame"] + 1
        server_log.info("job %d %r submitted: %s, %s", job_id, plan["name"],
                        plural(frames, "frame"),
                        plural(plan["task_count"], "task"))
        return self.job_summary(self.db.job(job_id))

    def job_summary(self, job, detail=False):
        counts = self.db.task_counts(job["id"])
        settings = json.loads(job["settings"])
        summary = {
            "id": job["id"],
            "name": job["name"],
            "state": job["state"],
            "priority": job["priority"],
            "max_workers": job["max_workers"],
            "width": settings["width"],
            "height": settings["height"],
            "animated": settings["animated"],
            "first_frame": job["first_frame"],
            "last_frame": job["last_frame"],
            "frames": job["frame_count"],
            "frames_done": job["frames_done"],
            "slices_per_frame": len(json.loads(job["row_ranges"])),
            "tasks": job["task_count"],
            "tasks_done": counts["done"],
            "tasks_running": counts["leased"],
            "tasks_queued": counts["queued"],
            "tasks_failed": counts["failed"],
            "progress": round(counts["rows_done"] / max(
                job["frame_count"] * settings["height"], 1), 4),
            "error": job["error"],
            "created": job["created"],
            "started": job["started"],
            "finished": job["finished"],
        }
        elapsed, left = job_timing(summary, time.time())
        summary["elapsed_seconds"] = elapsed
        summary["left_seconds"] = left
        if detail:
            summary["settings"] = settings
            summary["povray_options"] = json.loads(job["povray_options"])
            summary["done_frames"] = self.db.done_frames(job["id"])
            summary["frame_files"] = {
                str(frame): frame_file_name(job["name"], frame, settings)
                for frame in summary["done_frames"]}
            summary["failed_tasks"] = [
                self.task_summary(task)
                for task in self.db.tasks(job["id"], ("failed",), 100)]
            summary["running_tasks"] = [
                self.task_summary(task)
                for task in self.db.tasks(job["id"], ("leased",), 100)]
            summary["preview_frame"] = None
            if summary["slices_per_frame"] > 1:
                summary["preview_frame"] = self.db.preview_frame(job["id"])
        return summary

    def legacy_archive(self, job_id, name):
        """Return the path of the archive old clients download for a
        job, writing it the first time."""
        job = self.db.job(job_id)
        if legacy_name(job) != name:
            raise NotFound("no job archive %s.zip (job %d is %s.zip)"
                           % (name, job_id, legacy_name(job)))
        path = self.path("legacy", str(job_id), name + ".zip")
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_legacy_archive(
                self.path("archives", job["archive"] + ".zip"), job, path)
            server_log.info("job %d: wrote the archive for HTTPov "
                            "clients", job_id)
        return path

    def worker_summaries(self, now):
        """Return every worker with its state: busy, idle, or offline
        when it has not been heard from for STALE_WORKER_SECONDS."""
        workers = []
        for row in self.db.workers():
            seen = now - row["last_seen"]
            if seen > STALE_WORKER_SECONDS:
                state = "offline"
            else:
                state = "busy" if row["task_id"] else "idle"
            workers.append({
                "id": row["id"], "name": row["name"], "group": row["grp"],
                "host": row["host"], "state": state, "task": row["task_id"],
                "tasks_done": row["tasks_done"],
                "render_seconds": row["render_seconds"],
                "average_seconds": (row["render_seconds"] /
                                    row["tasks_done"]
                                    if row["tasks_done"] else None),
                "last_seen_seconds": round(seen, 1)})
        return workers

    def task_summary(self, task, with_log=True):
        summary = {key: task[key] for key in (
            "id", "job_id", "state", "frame_first", "frame_last",
            "row_first", "row_last", "attempts", "worker_id",
            "failed_worker", "progress", "error")}
        if with_log:
            summary["log"] = task["log"]
        return summary

    def control(self, job_id, action):
        if action == "delete":
            return self.delete(job_id)
        state = self.db.control_job(job_id, action, time.time())
        server_log.info("job %d: %s, now %s", job_id, action, state)
        return {"id": job_id, "state": state}

    def delete(self, job_id):
        job = self.db.delete_job(job_id)
        for folder in ("frames", "slices", "legacy"):
            shutil.rmtree(self.path(folder, str(int(job_id))),
                          ignore_errors=True)
        if not self.db.archive_in_use(job["archive"]):
            remove_quietly(self.path("archives", job["archive"] + ".zip"))
        server_log.info("job %d deleted", job_id)
        return {"id": job_id, "state": "deleted"}

    # -- workers and tasks --------------------------------------------------

    def register(self, body):
        name = json_field(body, "name", str, "worker")[:100] or "worker"
        group = json_field(body, "group", str, "")[:100]
        host = json_field(body, "host", str, "")[:200]
        worker_id = self.db.register_worker(name, group, host, time.time())
        server_log.info("worker %d registered as %a (group %a, host %a)",
                        worker_id, name, group, host)
        return {"worker": worker_id, "lease_seconds": self.lease_seconds,
                "max_result_bytes": self.max_result_bytes}

    def claim(self, worker_id):
        """Lease a task to a worker; a job whose stored data cannot be
        read is marked failed and the next job is tried."""
        while True:
            claimed = self.db.claim_task(worker_id, time.time(),
                                         self.lease_seconds)
            if claimed is None:
                return {"task": None, "retry_after": IDLE_POLL_SECONDS}
            task, job = claimed
            try:
                payload = self.task_payload(task, job)
            except (ValueError, KeyError, TypeError, OSError) as error:
                message = "job data is unreadable: %s" % error
                server_log.error("job %d: %s; job failed", job["id"],
                                 message)
                self.db.release_task(task["id"], task["attempt"])
                self.db.fail_job(job["id"], message, time.time())
                continue
            server_log.info("job %d task %d: leased to worker %d "
                            "(attempt %d)", job["id"], task["id"],
                            worker_id, task["attempts"])
            return {"task": payload}

    def task_payload(self, task, job):
        """Build the task description that a worker receives."""
        settings = json.loads(job["settings"])
        archive = self.path("archives", job["archive"] + ".zip")
        if not os.path.isfile(archive):
            raise OSError("archive %s is missing from the data folder"
                          % job["archive"])
        return {
            "id": task["id"],
            "attempt": task["attempt"],
            "job_id": job["id"],
            "job_name": job["name"],
            "archive": job["archive"],
            "root": job["root"],
            "ini": job["ini"],
            "povray_options": json.loads(job["povray_options"]),
            "settings": settings,
            "sliced": len(json.loads(job["row_ranges"])) > 1,
            "frame_first": task["frame_first"],
            "frame_last": task["frame_last"],
            "row_first": task["row_first"],
            "row_last": task["row_last"],
            "lease_seconds": self.lease_seconds,
        }

    def heartbeat(self, task_id, body):
        progress = json_field(body, "progress", float, 0.0)
        action = self.db.heartbeat(
            task_id, json_field(body, "attempt", str, required=True),
            json_field(body, "worker", int, required=True),
            min(max(progress, 0.0), 1.0) if progress == progress else 0.0,
            time.time(), self.lease_seconds)
        return {"action": action, "lease_seconds": self.lease_seconds}

    def fail(self, task_id, body):
        attempt = json_field(body, "attempt", str, required=True)
        error = json_field(body, "error", str, "")[:2000] or \
            "failed without a message"
        log_text = json_field(body, "log", str, "")[-MAX_LOG_BYTES:]
        job_failed = self.db.fail_task(task_id, attempt, error, log_text,
                                       time.time())
        task = self.db.task(task_id)
        server_log.warning("job %d task %d: attempt %s failed: %s%s",
                           task["job_id"], task_id, attempt[:8],
                           printable(error),
                           " (job failed)" if job_failed else "")
        return {"status": "recorded", "job_failed": job_failed}

    def release(self, task_id, body):
        self.db.release_task(task_id, json_field(body, "attempt", str,
                                                 required=True))
        server_log.info("task %d released by its worker", task_id)
        return {"status": "released"}

    def deliver(self, task_id, attempt, upload_path):
        """Check a result archive and accept it; return the response.

        The archive contains ``frames/<frame>.png`` for each frame of a
        whole-frame task, or ``slice.png`` for a slice (either just the
        slice's rows or POV-Ray's full-size partial render), plus an
        optional ``log.txt``.
        """
        if self.db.accepted_attempt(task_id, attempt):
            return {"status": "accepted", "duplicate": True}
        task, job = self.db.leased_task(task_id, attempt)
        settings = json.loads(job["settings"])
        sliced = len(json.loads(job["row_ranges"])) > 1
        prepared = []
        try:
            log_text = self.unpack_result(task, job, settings, sliced,
                                          upload_path, prepared)

            def place_files():
                for temp_path, final_path in prepared:
                    os.makedirs(os.path.dirname(final_path), exist_ok=True)
                    os.replace(temp_path, final_path)

            complete = self.db.accept_result(task_id, attempt, log_text,
                                             time.time(), place_files)
        finally:
            for temp_path, _ in prepared:
                remove_quietly(temp_path)
        server_log.info("job %d task %d: result of attempt %s accepted",
                        job["id"], task_id, attempt)
        if complete:
            self.finish_frames(job, complete)
        return {"status": "accepted", "duplicate": False}

    def unpack_result(self, task, job, settings, sliced, upload_path,
                      prepared):
        """Extract and check a result's PNGs into temporary files.

        Appends (temporary path, final path) pairs to ``prepared`` and
        returns the log text. Raises UserError for a result that does
        not hold exactly the expected images.
        """
        width, height = settings["width"], settings["height"]
        try:
            archive = zipfile.ZipFile(upload_path)
        except (zipfile.BadZipFile, OSError) as error:
            raise UserError("result is not a valid zip file (%s)" % error)
        with archive:
            names = set(archive.namelist())
            log_text = ""
            if "log.txt" in names:
                try:
                    with archive.open("log.txt") as source:
                        log_text = source.read(MAX_LOG_BYTES).decode(
                            "utf-8", "replace")
                except (zipfile.BadZipFile, zlib.error, EOFError) as error:
                    raise UserError("result archive is corrupt (%s)"
                                    % error)
            if sliced:
                expected = ["slice.png"]
            else:
                expected = ["frames/%d.png" % frame for frame in range(
                    task["frame_first"], task["frame_last"] + 1)]
            missing = [name for name in expected if name not in names]
            if missing:
                raise UserError("result of task %d is missing %s (it "
                                "contains: %s)"
                                % (task["id"], ", ".join(missing),
                                   ", ".join(sorted(names)) or "nothing"))
            largest = largest_png_bytes(width, height,
                                        self.max_result_bytes)
            for name in expected:
                member = archive.getinfo(name)
                temp_path = self.temp_path(".png")
                prepared.append((temp_path, None))
                copy_member(archive, member, temp_path, largest,
                            size=(width, height))
                if sliced:
                    final = self.slice_path(job["id"], task["frame_first"],
                                            task["id"])
                    prepared[-1] = (self.check_slice(
                        temp_path, task, settings, prepared), final)
                else:
                    frame = int(name[len("frames/"):-len(".png")])
                    try:
                        check_png(temp_path, width, height,
                                  settings["depth"], settings["alpha"])
                    except ImageError as error:
                        raise ImageError("frame %d of task %d: %s"
                                         % (frame, task["id"], error))
                    prepared[-1] = (temp_path,
                                    self.frame_path(job["id"], frame))
        return log_text

    def check_slice(self, temp_path, task, settings, prepared):
        # The caller has copied the slice; this checks and crops it.
        """Check a slice PNG; crop a full-size one to the task's rows."""
        width, height = settings["width"], settings["height"]
        rows = task["row_last"] - task["row_first"] + 1
        try:
            info = check_png(temp_path, depth=settings["depth"],
                             alpha=settings["alpha"])
        except ImageError as error:
            raise ImageError("slice of task %d: %s" % (task["id"], error))
        if info.width != width or info.height not in (rows, height):
            raise ImageError("slice of task %d is %dx%d, expected %dx%d "
                             "(its rows %d-%d) or the full %dx%d"
                             % (task["id"], info.width, info.height, width,
                                rows, task["row_first"], task["row_last"],
                                width, height))
        if info.height == rows:
            return temp_path
        cropped = self.temp_path(".png")
        prepared.append((cropped, None))
        crop_png(temp_path, cropped, task["row_first"], task["row_last"])
        return cropped

    def finish_frames(self, job, frames):
        """Stitch completed sliced frames and record finished frames."""
        sliced = len(json.loads(job["row_ranges"])) > 1
        settings = json.loads(job["settings"])
        finished = []
        for frame in frames:
            if sliced and not self.db.frame_done(job["id"], frame):
                tasks = self.db.frame_tasks(job["id"], frame)
                paths = [self.slice_path(job["id"], frame, task_id)
                         for task_id in tasks]
                target = self.frame_path(job["id"], frame)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                try:
                    stitch_pngs(target, paths, settings["width"],
                                settings["height"])
                except (ImageError, OSError) as error:
                    message = "stitching frame %d failed: %s" % (frame,
                                                                error)
                    server_log.error("job %d: %s", job["id"], message)
                    self.db.fail_job(job["id"], message, time.time())
                    continue
                server_log.info("job %d frame %d: stitched from %d slices",
                                job["id"], frame, len(paths))
            finished.append(frame)
        job_done = finished and self.db.mark_frames_done(
            job["id"], finished, time.time())
        if job_done:
            server_log.info("job %d: done", job["id"])
        if sliced:
            for frame in finished:
                shutil.rmtree(self.path("slices", str(job["id"]),
                                        str(frame)), ignore_errors=True)
            if job_done:
                shutil.rmtree(self.path("slices", str(job["id"])),
                              ignore_errors=True)


def lock_data_dir(data_dir):
    """Lock the data folder for this process; return the open lock file.

    Two servers on one database would lease the same tasks twice. The
    operating system drops the lock when the process dies, even by
    ``kill -9``.
    """
    lock_file = open(os.path.join(data_dir, "lock"), "a+")
    try:
        try:
            import fcntl
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:
            import msvcrt
            msvcrt.locking(lock_file.fileno(), msvcrt.LK_NBLCK, 1)
    except OSError:
        lock_file.close()
        raise UserError("data folder %s is in use by another httpov "
                           "server; stop it or pass another --data"
                           % data_dir)
    return lock_file


def describe_zip_error(error):
    return printable("%s: %s" % (type(error).__name__, error), 200)


def largest_png_bytes(width, height, cap):
    """Return the most bytes a result PNG may have: it is never much
    larger than its raw 16-bit RGBA pixels."""
    return min(cap, COPY_CHUNK_BYTES + 2 * (height * (1 + width * 8)))


def copy_member(archive, member, target, limit, signature=PNG_SIGNATURE,
                size=None):
    """Copy a zip member to a file, reading at most ``limit`` bytes.

    Raises UserError for a member that says it is larger than ``limit``,
    does not start with ``signature`` (a PNG's by default), is larger
    than its header says or fails to decompress. ``size`` (width,
    height) only words the error.
    """
    kind = "PNG" if signature == PNG_SIGNATURE else "PPM"
    if member.file_size > limit:
        image = "%dx%d %s" % (size + (kind,)) if size else kind
        raise TooLarge("%s unpacks to %d bytes, more than the %d a %s can "
                       "need" % (member.filename, member.file_size, limit,
                                 image))
    try:
        with archive.open(member) as source, open(target, "wb") as out:
            head = source.read(len(signature))
            if head != signature:
                raise ImageError("%s is not a %s file"
                                 % (member.filename, kind))
            out.write(head)
            left = limit - len(head)
            while True:
                chunk = source.read(min(COPY_CHUNK_BYTES, left + 1))
                if not chunk:
                    break
                left -= len(chunk)
                if left < 0:
                    raise TooLarge("%s is larger than %d bytes"
                                   % (member.filename, limit))
                out.write(chunk)
    except UserError:
        raise
    except Exception as error:
        # A hostile member fails in many ways: bad data, encryption
        # (RuntimeError), unknown compression (NotImplementedError) or a
        # decompressor's own error (LZMAError is a plain Exception).
        raise UserError("result archive member %s is corrupt or cannot "
                        "be read: %s" % (member.filename,
                                         describe_zip_error(error)))


def remove_tree_or_file(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        remove_quietly(path)


def load_or_create_tokens(data_dir, rotate=False):
    """Read the admin and worker tokens, creating them on first use."""
    path = os.path.join(data_dir, "tokens.json")
    if os.path.exists(path) and not rotate:
        with open(path) as source:
            tokens = json.load(source)
        if set(tokens) >= {"admin", "worker"}:
            return tokens
    # Hexadecimal, because a token that starts with "-" would be read as
    # an option on the command line.
    tokens = {"admin": secrets.token_hex(TOKEN_BYTES),
              "worker": secrets.token_hex(TOKEN_BYTES)}
    os.makedirs(data_dir, exist_ok=True)
    handle, temp_path = tempfile.mkstemp(dir=data_dir, prefix=".tmp-")
    with os.fdopen(handle, "w") as target:
        json.dump(tokens, target)
    if hasattr(os, "chmod"):
        os.chmod(temp_path, 0o600)
    os.replace(temp_path, path)
    return tokens


class FarmHTTPServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    """A threading HTTP server (``ThreadingHTTPServer`` needs 3.7).

    It handles at most ``max_connections`` connections at once, and
    ``max_address_connections`` of them from one client address, so
    that one host cannot take every slot. It responds 503 to the next
    ones. With ``tls_context`` it serves
    HTTPS; the TLS handshake runs in the connection's own thread, so a
    slow client cannot hold up the others.
    """

    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default backlog of 5 resets connections when many
    # workers reconnect at once, as after a restart.
    request_queue_size = 128

    def __init__(self, address, farm, max_connections=DEFAULT_MAX_CONNECTIONS,
                 tls_context=None,
                 max_address_connections=DEFAULT_MAX_ADDRESS_CONNECTIONS):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.farm = farm
        self.slots = threading.BoundedSemaphore(max_connections)
        self.max_address_connections = max_address_connections
        self.address_connections = collections.Counter()
        self.address_lock = threading.Lock()
        self.deadlines = Deadlines()
        self.tls_context = tls_context
        http.server.HTTPServer.__init__(self, address, FarmRequestHandler)

    def process_request(self, request, client_address):
        address = client_address[0]
        with self.address_lock:
            crowded = (self.address_connections[address]
                       >= self.max_address_connections)
            if not crowded:
                self.address_connections[address] += 1
        if crowded:
            self.reject(request, "too many connections from %s" % address)
            return
        if not self.slots.acquire(blocking=False):
            self.forget_connection(address)
            self.reject(request, "too many connections")
            return
        try:
            socketserver.ThreadingMixIn.process_request(
                self, request, client_address)
        except BaseException:
            self.slots.release()
            self.forget_connection(address)
            raise

    def reject(self, request, reason):
        """Respond 503 to a connection over the limits and close it."""
        if self.tls_context is not None:
            # A TLS client could not read a response sent before the
            # handshake, and would take it for a TLS failure. A closed
            # connection makes it retry later.
            server_log.warning("%s: connection closed", reason)
            self.shutdown_request(request)
            return
        server_log.warning("%s: responded 503", reason)
        body = (json.dumps({"error": reason + "; try again"}) + "\n"
                ).encode()
        try:
            request.sendall(
                b"HTTP/1.1 503 Service Unavailable\r\n"
                b"Content-Type: application/json\r\n"
                b"Retry-After: 5\r\nConnection: close\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        except OSError:
            pass
        self.shutdown_request(request)

    def forget_connection(self, address):
        with self.address_lock:
            self.address_connections[address] -= 1
            if self.address_connections[address] <= 0:
                del self.address_connections[address]

    def process_request_thread(self, request, client_address):
        try:
            if self.tls_context is not None:
                request = self.start_tls(request, client_address)
                if request is None:
                    return
            socketserver.ThreadingMixIn.process_request_thread(
                self, request, client_address)
        finally:
            self.slots.release()
            self.forget_connection(client_address[0])

    def start_tls(self, request, client_address):
        """Run the TLS handshake; return the TLS socket, or None."""
        request.settimeout(HTTP_TIMEOUT_SECONDS)
        try:
            # Wrapping can already fail on a connection the client reset.
            request = self.tls_context.wrap_socket(
                request, server_side=True, do_handshake_on_connect=False)
        except (ssl.SSLError, OSError) as error:
            server_log.info("TLS connection from %s failed: %s",
                            client_address[0], error)
            self.shutdown_request(request)
            return None
        self.deadlines.watch(request, HEADER_TIMEOUT_SECONDS)
        try:
            request.do_handshake()
        except (ssl.SSLError, OSError) as error:
            server_log.info("TLS handshake with %s failed: %s",
                            client_address[0], error)
            self.shutdown_request(request)
            return None
        finally:
            self.deadlines.forget(request)
        return request

    def handle_error(self, request, client_address):
        """Log a connection the client broke off in one line, and any
        other error with its traceback."""
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            server_log.info("connection from %s ended: %s",
                            client_address[0], error)
        else:
            server_log.exception("request from %s failed",
                                 client_address[0])

    def serve_forever(self, poll_interval=0.5):
        threading.Thread(target=self.deadlines.run, daemon=True,
                         name="deadlines").start()
        http.server.HTTPServer.serve_forever(self, poll_interval)


class Deadlines:
    """Closes connections whose client is too slow to send.

    A handler registers its socket with a deadline before it reads the
    request headers or a body, and removes it afterwards. Once a second
    the sockets past their deadline are shut down, which ends the read
    that waits on them.
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.sockets = {}

    def watch(self, connection, seconds):
        with self.lock:
            self.sockets[connection] = time.monotonic() + seconds

    def forget(self, connection):
        with self.lock:
            self.sockets.pop(connection, None)

    def run(self):
        while True:
            time.sleep(1.0)
            now = time.monotonic()
            with self.lock:
                late = [connection for connection, deadline in
                        self.sockets.items() if deadline < now]
                for connection in late:
                    del self.sockets[connection]
            for connection in late:
                try:
                    peer = connection.getpeername()[0]
                except OSError:
                    peer = "?"
                server_log.warning("client %s too slow; connection closed",
                                   peer)
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


# (method, path pattern, handler method name, role needed)
ROUTES = [
    ("GET", r"/", "page_status", "page"),
    ("GET", r"/api/openapi\.json", "api_openapi", "page"),
    ("GET", r"/api/jobs", "api_jobs", "admin"),
    ("POST", r"/api/jobs", "api_submit", "admin"),
    ("GET", r"/api/jobs/(\d{1,18})", "api_job", "admin"),
    ("POST", r"/api/jobs/(\d{1,18})", "api_update_job", "admin"),
    ("DELETE", r"/api/jobs/(\d{1,18})", "api_delete_job", "admin"),
    ("POST", r"/api/jobs/(\d{1,18})/(pause|resume|cancel|retry|delete)",
     "api_control_job", "admin"),
    ("GET", r"/api/jobs/(\d{1,18})/tasks", "api_tasks", "admin"),
    ("GET", r"/api/jobs/(\d{1,18})/frames/(-?\d{1,18})\.png",
     "api_frame", "admin"),
    ("GET", r"/api/jobs/(\d{1,18})/frames\.zip", "api_frames_zip",
     "admin"),
    ("GET", r"/api/jobs/(\d{1,18})/animation\.png", "api_animation",
     "admin"),
    ("GET", r"/api/jobs/(\d{1,18})/animation\.mp4", "api_animation_mp4",
     "admin"),
    ("GET", r"/api/jobs/(\d{1,18})/preview/(-?\d{1,18})\.png",
     "api_preview", "admin"),
    ("GET", r"/jobs/(\d{1,18})", "page_job", "page"),
    ("GET", r"/static/httpov\.js", "static_script", "page"),
    ("GET", r"/favicon\.ico", "favicon", "page"),
    ("GET", r"/submit", "page_submit", "page"),
    ("POST", r"/submit", "page_submit_upload", "page"),
    ("POST", r"/jobs/(\d{1,18})/control", "page_job_control", "page"),
    ("GET", r"/httpov\.php", "legacy_root", "page"),
    ("POST", r"/httpov\.php", "legacy_root", "page"),
    ("GET", r"/jobs/(\d{1,18})-([A-Za-z0-9._-]{0,60})\.zip",
     "legacy_root_archive", "page"),
    ("GET", r"/legacy/version", "legacy_version", "page"),
    ("GET", r"/legacy/([^/]{1,200})/httpov\.php", "legacy_token", "page"),
    ("POST", r"/legacy/([^/]{1,200})/httpov\.php", "legacy_token", "page"),
    ("GET", r"/legacy/([^/]{1,200})/jobs/(\d{1,18})-([A-Za-z0-9._-]{0,60})"
     r"\.zip", "legacy_token_archive", "page"),
    ("GET", r"/api/tasks/(\d{1,18})", "api_task", "admin"),
    ("GET", r"/jobs/(\d{1,18})/tasks/(\d{1,18})", "page_task", "page"),
    ("GET", r"/api/workers", "api_workers", "admin"),
    ("POST", r"/api/workers", "api_register", "worker"),
    ("POST", r"/api/claim", "api_claim", "worker"),
    ("GET", r"/api/archives/([0-9a-f]{64})\.zip", "api_archive", "worker"),
    ("POST", r"/api/tasks/(\d{1,18})/heartbeat", "api_heartbeat",
     "worker"),
    ("POST", r"/api/tasks/(\d{1,18})/result", "api_result", "worker"),
    ("POST", r"/api/tasks/(\d{1,18})/fail", "api_fail", "worker"),
    ("POST", r"/api/tasks/(\d{1,18})/release", "api_release", "worker"),
]
COMPILED_ROUTES = [(method, re.compile("^" + pattern + "$"), name, role)
                   for method, pattern, name, role in ROUTES]


class FarmRequestHandler(http.server.BaseHTTPRequestHandler):
    """Routes a request to its API method and turns errors into JSON."""

    protocol_version = "HTTP/1.1"
    server_version = "httpov/" + __version__
    # Headers and body go out in two sends; without TCP_NODELAY the body
    # waits about 40 ms for the client's delayed ACK.
    disable_nagle_algorithm = True
    timeout = HTTP_TIMEOUT_SECONDS

    def log_message(self, format, *args):
        server_log.debug("%s %s", self.address_string(),
                         self.loggable(format % args))

    def loggable(self, text):
        """Hide tokens (the login link carries one) and control bytes."""
        for token in self.farm.tokens.values() if self.farm else ():
            text = text.replace(token, "<token>")
        text = re.sub(r"(?i)(%74|t)oken=[^&\s\"']*", "token=<hidden>", text)
        return printable(text)

    def send_error(self, code, message=None, explain=None):
        """Send errors found by http.server itself (a bad request line,
        too many headers, an unknown method) as JSON, like the API."""
        self.close_connection = True
        self.body_read = True
        text = self.loggable(message or http.HTTPStatus(code).phrase)
        server_log.info("%s: %d %s", self.address_string(), code, text)
        try:
            self.send_json({"error": text}, code)
        except OSError:
            pass

    def handle_expect_100(self):
        # No "100 Continue" before the token has been checked; the client
        # sends its body after a short wait anyway.
        return True

    def handle_one_request(self):
        self.server.deadlines.watch(self.connection, HEADER_TIMEOUT_SECONDS)
        try:
            http.server.BaseHTTPRequestHandler.handle_one_request(self)
        finally:
            self.server.deadlines.forget(self.connection)

    def __getattr__(self, name):
        # http.server calls do_<METHOD>. Every method goes to dispatch(),
        # so one it does not know (TRACE, QUERY, ...) gets 405 or 404 from
        # the routes, not http.server's 501, which reads as a server fault.
        if name.startswith("do_"):
            return lambda: self.dispatch(name[3:])
        raise AttributeError(name)

    @property
    def farm(self):
        return self.server.farm

    def dispatch(self, method):
        self.server.deadlines.forget(self.connection)
        self.body_read = False
        if sum(len(name) + len(value) + 4
               for name, value in self.headers.items()) > MAX_HEADER_BYTES:
            self.close_connection = True
            self.send_json({"error": "request headers are larger than %d "
                            "bytes" % MAX_HEADER_BYTES}, 431)
            return
        parsed = urllib.parse.urlsplit(self.path)
        self.query = urllib.parse.parse_qs(parsed.query,
                                           keep_blank_values=True)
        failure = None
        try:
            route, arguments = self.find_route(method, parsed.path)
            self.check_access(route[3])
            getattr(self, route[2])(*arguments)
        except UserError as error:
            failure = (error.status, str(error),
                       getattr(error, "headers", None))
        except DatabaseBusy as error:
            server_log.warning("%s %s: database busy (%s), responded 503",
                               method, self.loggable(parsed.path), error)
            failure = (503, "the server is busy; try again",
                       {"Retry-After": "2"})
        except (BrokenPipeError, ConnectionResetError, socket.timeout,
                ssl.SSLEOFError):
            self.close_connection = True
        except Exception as error:
            if type(error).__name__ == "OperationalError" and \
                    "locked" in str(error):
                server_log.warning("%s %s: database locked, responded 503",
                                   method, self.loggable(parsed.path))
                failure = (503, "the server is busy; try again",
                           {"Retry-After": "2"})
            else:
                server_log.exception("%s %s failed", method,
                                     self.loggable(parsed.path))
                failure = (500, "internal server error; see the server "
                           "log", None)
        if failure is None:
            return
        status, message, headers = failure
        try:
            self.send_json({"error": message}, status, headers)
        except OSError:
            # The client has closed the connection, so the error is
            # dropped.
            self.close_connection = True

    def find_route(self, method, path):
        allowed = []
        for route in COMPILED_ROUTES:
            match = route[1].match(path)
            if match:
                if route[0] == method or (method == "HEAD" and
                                          route[0] == "GET"):
                    return route, match.groups()
                allowed.append(route[0])
        if allowed:
            raise MethodNotAllowed("method %s is not allowed on %s "
                                   "(allowed: %s)"
                                   % (method, path, ", ".join(allowed)))
        raise NotFound("no such page or API endpoint: %s" % path)

    # -- authentication -----------------------------------------------------

    def presented_token(self):
        header = self.headers.get("Authorization", "")
        if header.lower().startswith("bearer "):
            return header[7:].strip()
        return None

    def has_session(self):
        cookies = self.headers.get("Cookie", "")
        for part in cookies.split(";"):
            name, _, value = part.strip().partition("=")
            if name == SESSION_COOKIE and hmac.compare_digest(
                    value.encode(), self.farm.session.encode()):
                return True
        return False

    def check_access(self, role):
        self.farm.reload_tokens()
        token = self.presented_token()
        is_admin = self.is_admin_request()
        is_worker = token is not None and hmac.compare_digest(
            token.encode(), self.farm.tokens["worker"].encode())
        if role == "page":
            return
        if is_admin or (role == "worker" and is_worker):
            return
        if role == "admin" and self.command in ("GET", "HEAD") and (
                self.farm.public_status or self.has_session()):
            return
        if role == "admin" and self.has_session() and self.csrf_header():
            # Another site's page cannot send this header without this
            # server's consent (CORS), so the request is the page's own.
            return
        if token is None and self.has_session():
            raise Unauthorized("missing or invalid X-CSRF-Token header: "
                               "reload the page and try again")
        if token is None:
            raise Unauthorized("missing token: send the header "
                               "'Authorization: Bearer TOKEN' (see "
                               "'httpov.py token')")
        raise Unauthorized("invalid token: this request needs the %s "
                           "token (see 'httpov.py token')"
                           % ("admin" if role == "admin" else
                              "worker or admin"))

    # -- request bodies -----------------------------------------------------

    def content_length(self, limit):
        if self.headers.get("Transfer-Encoding") or \
                len(self.headers.get_all("Content-Length") or []) > 1:
            self.close_connection = True
            raise UserError("Transfer-Encoding and repeated Content-Length "
                            "headers are not supported; send one "
                            "Content-Length")
        value = self.headers.get("Content-Length")
        if value is None:
            self.close_connection = True
            raise LengthRequired("missing Content-Length header")
        if not re.match(r"^[0-9]{1,18}$", value.strip()):
            self.close_connection = True
            raise UserError("invalid Content-Length %r" % value)
        length = int(value)
        if length < 0:
            self.close_connection = True
            raise UserError("invalid Content-Length %r" % value)
        if length > limit:
            if length <= MAX_DRAINED_BYTES:
                # Read a small body, so that the client, still sending,
                # gets the 413 instead of a broken connection.
                self.read_small_body(length)
            self.close_connection = True
            raise TooLarge("request body of %d bytes is larger than the "
                           "limit of %d bytes" % (length, limit))
        return length

    @contextlib.contextmanager
    def body_deadline(self, length):
        """Cut the connection off if a body of ``length`` bytes comes
        slower than MIN_UPLOAD_BYTES_PER_SECOND, so that a slow sender
        cannot hold it."""
        self.server.deadlines.watch(
            self.connection, HEADER_TIMEOUT_SECONDS +
            length / MIN_UPLOAD_BYTES_PER_SECOND)
        try:
            yield
        finally:
            self.server.deadlines.forget(self.connection)

    def read_small_body(self, length):
        """Read a body kept in memory, under the upload deadline."""
        with self.body_deadline(length):
            data = self.rfile.read(length)
        self.body_read = True
        return data

    def read_json(self):
        length = self.content_length(MAX_JSON_BYTES)
        data = self.read_small_body(length)
        if len(data) < length:
            self.close_connection = True
            raise UserError("request body is truncated")
        if not data.strip():
            return {}
        try:
            body = json.loads(data.decode("utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError) as error:
            raise UserError("request body is not valid JSON (%s)" % error)
        if not isinstance(body, dict):
            raise UserError("request body must be a JSON object")
        return body

    def read_body_to_file(self, limit, suffix):
        """Stream the request body into a file under the data folder."""
        length = self.content_length(limit)
        path = self.farm.temp_path(suffix)
        try:
            left = length
            with self.body_deadline(length), open(path, "wb") as target:
                while left:
                    chunk = self.rfile.read(min(left, COPY_CHUNK_BYTES))
                    if not chunk:
                        self.close_connection = True
                        raise UserError("upload truncated after %d of %d "
                                        "bytes" % (length - left, length))
                    target.write(chunk)
                    left -= len(chunk)
        except BaseException:
            remove_quietly(path)
            raise
        self.body_read = True
        return path

    def query_value(self, name, default=None):
        values = self.query.get(name)
        return values[-1] if values else default

    # -- responses ----------------------------------------------------------

    def send_json(self, value, status=200, headers=None):
        data = (json.dumps(value, separators=(",", ":")) + "\n").encode()
        self.send_bytes(data, "application/json", status, headers)

    def send_bytes(self, data, content_type, status=200, headers=None):
        if not self.body_read and (
                self.headers.get("Content-Length", "0").strip() != "0" or
                self.headers.get("Transfer-Encoding")):
            # An unread body, whatever the method, would be taken for the
            # next request.
            self.close_connection = True
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_security_headers()
        if self.close_connection:
            self.send_header("Connection", "close")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_security_headers(self):
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Security-Policy", PAGE_POLICY)

    def send_file(self, path, content_type, download_name=None,
                  disposition="inline"):
        try:
            source = open(path, "rb")
        except OSError:
            raise NotFound("file not found")
        with source:
            size = os.fstat(source.fileno()).st_size
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(size))
            self.send_security_headers()
            if download_name:
                self.send_header("Content-Disposition", '%s; filename="%s"'
                                 % (disposition, download_name))
            self.end_headers()
            if self.command != "HEAD":
                shutil.copyfileobj(source, self.wfile, COPY_CHUNK_BYTES)

    # -- API endpoints ------------------------------------------------------

    def api_openapi(self):
        self.send_json(openapi_document())

    def api_jobs(self):
        self.send_json({"jobs": [self.farm.job_summary(job)
                                 for job in self.farm.db.jobs()]})

    def api_submit(self):
        if self.headers.get("Content-Type", "").lower().startswith(
                "multipart/form-data"):
            self.send_json(self.submit_form(), 201)
            return
        options = {name: self.query_value(name) for name in
                   JOB_OPTION_NAMES if self.query_value(name) is not None}
        options["povray_options"] = self.query.get("option", [])
        upload = self.read_body_to_file(self.farm.max_job_bytes, ".zip")
        try:
            summary = self.farm.submit(upload, options)
        except UserError as error:
            server_log.warning("job submission rejected: %s", error)
            raise
        finally:
            remove_quietly(upload)
        self.send_json(summary, 201)

    def api_job(self, job_id):
        job = self.farm.db.job(int(job_id))
        self.send_json(self.farm.job_summary(job, detail=True))

    def api_update_job(self, job_id):
        body = self.read_json()
        priority = json_field(body, "priority", int)
        max_workers = json_field(body, "max_workers", int)
        if priority is not None:
            priority = parse_int(priority, "priority", -1000000, 1000000)
        if max_workers is not None:
            max_workers = parse_int(max_workers, "max workers", 0, 1000000)
        self.farm.db.update_job(int(job_id), priority, max_workers)
        server_log.info("job %s: priority %s, max workers %s", job_id,
                        priority, max_workers)
        self.send_json(self.farm.job_summary(self.farm.db.job(int(job_id))))

    def api_delete_job(self, job_id):
        self.send_json(self.farm.delete(int(job_id)))

    def api_control_job(self, job_id, action):
        self.send_json(self.farm.control(int(job_id), action))

    def api_tasks(self, job_id):
        self.farm.db.job(int(job_id))
        limit = parse_int(self.query_value("limit", str(MAX_LISTED_TASKS)),
                          "limit", 1, MAX_LISTED_TASKS)
        tasks = self.farm.db.tasks(int(job_id), limit=limit)
        self.send_json({"tasks": [self.farm.task_summary(task, False)
                                  for task in tasks]})

    def api_task(self, task_id):
        self.send_json(self.farm.task_summary(self.farm.db.task(
            int(task_id))))

    def api_frame(self, job_id, frame):
        job = self.farm.db.job(int(job_id))
        if not job["first_frame"] <= int(frame) <= job["last_frame"]:
            raise NotFound("job %s has no frame %s (frames %d-%d)"
                           % (job_id, frame, job["first_frame"],
                              job["last_frame"]))
        if not self.farm.db.frame_done(int(job_id), int(frame)):
            raise NotFound("frame %s of job %s is not finished"
                           % (frame, job_id))
        name = frame_file_name(job["name"], int(frame),
                               json.loads(job["settings"]))
        self.send_file(self.farm.frame_path(job_id, frame), "image/png",
                       name)

    def finished_frames(self, job_id):
        """Return the job and (frame, file name, path) of done frames."""
        job = self.farm.db.job(int(job_id))
        settings = json.loads(job["settings"])
        frames = [(frame, frame_file_name(job["name"], frame, settings),
                   self.farm.frame_path(job["id"], frame))
                  for frame in self.farm.db.done_frames(job["id"])]
        if not frames:
            raise NotFound("job %s has no finished frames yet" % job_id)
        return job, frames

    def api_frames_zip(self, job_id):
        job, frames = self.finished_frames(job_id)
        temp_path = self.farm.temp_path(".zip")
        try:
            with zipfile.ZipFile(temp_path, "w") as archive:
                for _, name, path in frames:
                    archive.write(path, name)
            self.send_file(temp_path, "application/zip",
                           safe_file_name(job["name"]) + ".zip",
                           "attachment")
        finally:
            remove_quietly(temp_path)

    def api_animation(self, job_id):
        job, frames = self.finished_frames(job_id)
        temp_path = self.farm.temp_path(".png")
        try:
            write_apng(temp_path, [path for _, _, path in frames])
            self.send_file(temp_path, "image/apng",
                           safe_file_name(job["name"]) + "-animation.png")
        finally:
            remove_quietly(temp_path)

    def api_animation_mp4(self, job_id):
        if self.command == "HEAD":
            raise MethodNotAllowed("HEAD would encode the whole video; "
                                   "use GET")
        program = ffmpeg_path()
        if not program:
            raise NotFound("ffmpeg is not installed on the server; install "
                           "it, or download animation.png instead")
        job, frames = self.finished_frames(job_id)
        if not self.farm.encoding.acquire(False):
            raise Unavailable("another MP4 is being encoded; try again in "
                              "a minute")
        folder = tempfile.mkdtemp(dir=self.farm.path("tmp"))
        target = self.farm.temp_path(".mp4")
        try:
            server_log.info("job %s: encoding %d frames as MP4", job_id,
                            len(frames))
            try:
                encode_mp4(program, [path for _, _, path in frames],
                           target, folder)
            finally:
                self.farm.encoding.release()
            self.send_file(target, "video/mp4",
                           safe_file_name(job["name"]) + ".mp4",
                           "attachment")
        finally:
            shutil.rmtree(folder, True)
            remove_quietly(target)

    def api_preview(self, job_id, frame):
        """Send a frame as far as it is rendered: the finished PNG, or
        the slices that have arrived with black rows for the rest."""
        job = self.farm.db.job(int(job_id))
        frame = int(frame)
        if self.farm.db.frame_done(job["id"], frame):
            self.send_file(self.farm.frame_path(job["id"], frame),
                           "image/png")
            return
        parts = []
        for task in self.farm.db.frame_slices(job["id"], frame):
            path = self.farm.slice_path(job["id"], frame, task["id"])
            done = task["state"] == "done" and os.path.exists(path)
            parts.append((path if done else None,
                          task["row_last"] - task["row_first"] + 1))
        if len(parts) < 2 or not any(path for path, _ in parts):
            raise NotFound("frame %d of job %s has no finished slice yet"
                           % (frame, job_id))
        temp_path = self.farm.temp_path(".png")
        try:
            write_partial_frame(temp_path, parts,
                                json.loads(job["settings"])["width"])
            self.send_file(temp_path, "image/png")
        finally:
            remove_quietly(temp_path)

    def api_workers(self):
        self.send_json({"workers": self.farm.worker_summaries(time.time())})

    def api_register(self):
        self.send_json(self.farm.register(self.read_json()), 201)

    def api_claim(self):
        body = self.read_json()
        worker_id = json_field(body, "worker", int, required=True)
        self.send_json(self.farm.claim(worker_id))

    def api_archive(self, archive_sha):
        if not ARCHIVE_NAME.match(archive_sha):
            raise NotFound("archive not found")
        self.send_file(self.farm.path("archives", archive_sha + ".zip"),
                       "application/zip")

    def api_heartbeat(self, task_id):
        body = self.read_json()
        try:
            self.send_json(self.farm.heartbeat(int(task_id), body))
        except Conflict as error:
            server_log.warning("task %s: heartbeat rejected: %s",
                               task_id, error)
            raise

    def api_result(self, task_id):
        attempt = self.query_value("attempt")
        if not attempt:
            raise UserError("missing attempt parameter")
        upload = self.read_body_to_file(self.farm.max_result_bytes, ".zip")
        try:
            self.send_json(self.farm.deliver(int(task_id), attempt, upload))
        except Conflict as error:
            server_log.warning("task %s: result of attempt %s rejected: %s",
                               task_id, attempt, error)
            raise
        except UserError as error:
            # A result that fails its checks is a failed attempt.
            server_log.warning("task %s: result of attempt %s is invalid: "
                               "%s", task_id, attempt, error)
            try:
                self.farm.fail(int(task_id), {
                    "attempt": attempt,
                    "error": "invalid result: %s" % error})
            except Conflict:
                pass
            raise
        finally:
            remove_quietly(upload)

    def api_fail(self, task_id):
        self.send_json(self.farm.fail(int(task_id), self.read_json()))

    def api_release(self, task_id):
        self.send_json(self.farm.release(int(task_id), self.read_json()))

    # -- the status page ----------------------------------------------------

    def static_script(self):
        self.send_bytes(PAGE_SCRIPT.encode(), "text/javascript; "
                        "charset=utf-8")

    def favicon(self):
        # Browsers ask for it on every page; no icon, and no 404 noise.
        self.send_response(204)
        self.send_security_headers()
        self.end_headers()

    def logged_in(self):
        """Handle a login link (?token=ADMIN) on any page: store the
        session cookie and reload the page without the token. Return
        True when the page may be shown; otherwise a response is sent."""
        token = self.query_value("token")
        if token is not None:
            if not hmac.compare_digest(token.encode(),
                                       self.farm.tokens["admin"].encode()):
                server_log.warning("status page: login with an invalid "
                                   "token from %s", self.address_string())
                page = render_login_page("The token in this link is "
                                         "invalid.")
                self.send_bytes(page.encode(), "text/html; charset=utf-8",
                                401)
                return False
            cookie = ("%s=%s; HttpOnly; SameSite=Strict; Path=/%s"
                      % (SESSION_COOKIE, self.farm.session,
                         "; Secure" if self.server.tls_context else ""))
            # The path matched a page route, so it is one of ours.
            location = urllib.parse.urlsplit(self.path).path
            self.send_bytes(b"", "text/plain", 303,
                            {"Location": location, "Set-Cookie": cookie})
            return False
        if not self.may_read_pages():
            self.send_bytes(render_login_page().encode(),
                            "text/html; charset=utf-8", 401)
            return False
        return True

    def page_status(self):
        if not self.logged_in():
            return
        jobs = [self.farm.job_summary(job, detail=True)
                for job in self.farm.db.jobs()]
        page = render_status_page(
            jobs, self.farm.worker_summaries(time.time()))
        self.send_bytes(page.encode(), "text/html; charset=utf-8", 200)

    def may_read_pages(self):
        return self.farm.public_status or self.has_session() or \
            self.is_admin_request()

    def page_job(self, job_id):
        if not self.logged_in():
            return
        job = self.farm.job_summary(self.farm.db.job(int(job_id)),
                                    detail=True)
        tasks = [self.farm.task_summary(task, False) for task in
                 self.farm.db.tasks(int(job_id), limit=MAX_GRID_TASKS)]
        # --public-status readers see no forms: the CSRF token is for the
        # session alone.
        csrf = self.csrf_token() if self.has_session() or \
            self.is_admin_request() else None
        page = render_job_page(job, tasks, csrf)
        self.send_bytes(page.encode(), "text/html; charset=utf-8", 200)

    def page_task(self, job_id, task_id):
        if not self.logged_in():
            return
        task = self.farm.db.task(int(task_id))
        if task["job_id"] != int(job_id):
            raise NotFound("job %s has no task %s" % (job_id, task_id))
        job = self.farm.db.job(task["job_id"])
        page = render_task_page(job, self.farm.task_summary(task))
        self.send_bytes(page.encode(), "text/html; charset=utf-8", 200)

    def csrf_token(self):
        return hmac.new(self.farm.session.encode(), b"csrf",
                        hashlib.sha256).hexdigest()

    def csrf_header(self):
        """Tell whether the request carries the page's CSRF token in the
        X-CSRF-Token header."""
        return hmac.compare_digest(
            self.headers.get("X-CSRF-Token", "").encode(),
            self.csrf_token().encode())

    def page_job_control(self, job_id):
        """Apply a form of the job page: an action or new settings.

        The form needs the session cookie and its CSRF token, so another
        site cannot submit it in the user's name.
        """
        length = self.content_length(MAX_JSON_BYTES)
        form = urllib.parse.parse_qs(self.read_small_body(length).decode(
            "utf-8", "replace"))
        csrf = (form.get("csrf") or [""])[0]
        if not (self.has_session() and hmac.compare_digest(
                csrf.encode(), self.csrf_token().encode())):
            raise Unauthorized("invalid or missing CSRF token; reload the "
                               "job page and try again")
        action = (form.get("action") or [""])[0]
        target = "/jobs/%d" % int(job_id)
        if action in JOB_ACTIONS:
            self.farm.control(int(job_id), action)
            if action == "delete":
                target = "/"
        elif action == "update":
            self.farm.db.update_job(
                int(job_id),
                parse_int((form.get("priority") or ["0"])[0], "priority",
                          -1000000, 1000000),
                parse_int((form.get("max_workers") or ["0"])[0],
                          "max workers", 0, 1000000))
        else:
            raise UserError("unknown form action %r" % action)
        self.send_bytes(b"", "text/plain", 303, {"Location": target})

    def page_submit(self):
        if not self.logged_in():
            return
        if not self.has_session() and not self.is_admin_request():
            self.send_bytes(render_login_page().encode(),
                            "text/html; charset=utf-8", 401)
            return
        self.send_bytes(render_submit_page(self.csrf_token()).encode(),
                        "text/html; charset=utf-8", 200)

    def page_submit_upload(self):
        """Create a job from the submit page's form sent without the
        page's script, and show the job's page."""
        summary = self.submit_form()
        self.send_bytes(b"", "text/plain", 303,
                        {"Location": "/jobs/%d" % summary["id"]})

    def submit_form(self):
        """Create a job from the submit page's multipart form; return the
        job's summary."""
        if not self.has_session() and not self.is_admin_request():
            self.close_connection = True
            raise Unauthorized("log in first: open the login link that "
                               "'httpov.py serve' printed")
        match = MULTIPART_TYPE.match(self.headers.get("Content-Type", ""))
        if not match:
            raise UserError("expected a multipart/form-data upload")
        upload = self.read_body_to_file(
            self.farm.max_job_bytes + MAX_JSON_BYTES, ".form")
        archive = self.farm.temp_path(".zip")
        try:
            fields, file_name = parse_multipart(
                upload, match.group(1).encode("latin-1"), archive,
                self.farm.max_job_bytes)
            csrf = fields.get("csrf", "")
            if not self.is_admin_request() and not (
                    self.has_session() and hmac.compare_digest(
                        csrf.encode(), self.csrf_token().encode())):
                raise Unauthorized("invalid or missing CSRF token; reload "
                                   "the submit page and try again")
            if not file_name:
                raise UserError("no file chosen: pick a .zip, .pov or "
                                ".ini file")
            if not file_name.lower().endswith(".zip"):
                single = os.path.basename(file_name.replace("\\", "/"))
                if not single.lower().endswith(SCENE_SUFFIXES):
                    raise UserError("%r is not a .zip, .pov or .ini file"
                                    % single)
                check_member_name(single)
                wrapped = self.farm.temp_path(".zip")
                with zipfile.ZipFile(wrapped, "w") as job_zip:
                    job_zip.write(archive, single)
                os.replace(wrapped, archive)
            options = {name: fields[name] for name in JOB_OPTION_NAMES
                       if fields.get(name, "").strip()}
            options.setdefault("name", os.path.splitext(
                os.path.basename(file_name.replace("\\", "/")))[0])
            options["povray_options"] = fields.get(
                "povray_options", "").split()
            summary = self.farm.submit(archive, options)
        finally:
            remove_quietly(upload)
            remove_quietly(archive)
        return summary

    # -- HTTPov 0.9 clients (section 7) -------------------------------------

    def send_legacy(self, lines, status=200):
        body = "".join(line + "\n" for line in lines)
        self.send_bytes(body.encode("utf-8", "replace"),
                        "text/plain; charset=utf-8", status)

    def legacy_from_network(self):
        """Tell whether the client's address is in --legacy-clients."""
        try:
            address = ipaddress.ip_address(self.client_address[0])
        except ValueError:
            return False
        if getattr(address, "ipv4_mapped", None):
            address = address.ipv4_mapped
        return any(address in network
                   for network in self.farm.legacy_networks)

    def legacy_refused(self, status):
        """Reject a client outside --legacy-clients. The protocol's own
        replies are always status 200, and old clients print the error
        line of one; archive downloads get the HTTP status."""
        server_log.warning("HTTPov client at %s rejected: its address is "
                           "not in --legacy-clients", self.address_string())
        self.send_legacy(["error=this server does not accept HTTPov clients "
                          "from %s; use the address with the worker token "
                          "(/legacy/TOKEN/) or start serve with "
                          "--legacy-clients" % self.client_address[0]],
                         status)

    def legacy_token_valid(self, token, status):
        if hmac.compare_digest(token.encode(),
                               self.farm.tokens["worker"].encode()):
            return True
        server_log.warning("HTTPov client at %s: invalid token in the "
                           "address", self.address_string())
        self.send_legacy(["error=the server address holds no valid worker "
                          "token; see 'httpov.py token'"], status)
        return False

    def legacy_root(self):
        if not self.legacy_from_network():
            self.legacy_refused(200)
            return
        self.legacy_command()

    def legacy_token(self, token):
        if self.legacy_token_valid(token, 200):
            self.legacy_command()

    def legacy_command(self):
        """Run one command of the HTTPov 0.9 protocol and send the reply.

        Old clients read no JSON, so a bad upload gets the protocol's
        status=error line as its reply.
        """
        if self.command not in ("GET", "POST"):
            raise MethodNotAllowed("the HTTPov protocol uses GET and POST "
                                   "only")
        protocol = LegacyProtocol(self.farm, self.query,
                                  self.client_address[0])
        if self.command == "GET":
            self.send_legacy(protocol.run_command())
            return
        try:
            self.legacy_upload(protocol)
        except UserError as error:
            server_log.warning("HTTPov client at %s: upload rejected: %s",
                               self.address_string(),
                               printable(str(error)))
            self.close_connection = True
            self.send_legacy(["status=error"])

    def legacy_upload(self, protocol):
        """Read a postbatch upload and run its command."""
        match = MULTIPART_TYPE.match(self.headers.get("Content-Type", ""))
        if not match:
            raise UserError("expected a multipart/form-data upload")
        body = self.read_body_to_file(
            self.farm.max_result_bytes + MAX_JSON_BYTES, ".form")
        upload = self.farm.temp_path(".zip")
        try:
            _, file_name = parse_multipart(
                body, match.group(1).encode("latin-1"), upload,
                self.farm.max_result_bytes, "filedata")
            self.send_legacy(protocol.run_command(
                upload if file_name else None))
        finally:
            remove_quietly(body)
            remove_quietly(upload)

    def legacy_root_archive(self, job_id, name):
        if not self.legacy_from_network():
            self.legacy_refused(403)
            return
        self.legacy_send_archive(job_id, name)

    def legacy_token_archive(self, token, job_id, name):
        if self.legacy_token_valid(token, 401):
            self.legacy_send_archive(job_id, name)

    def legacy_send_archive(self, job_id, name):
        name = "%s-%s" % (job_id, name)
        path = self.farm.legacy_archive(int(job_id), name)
        self.send_file(path, "application/zip", name + ".zip",
                       "attachment")

    def legacy_version(self):
        """Reply to the clients' update check with their newest version."""
        family = (self.query_value("version") or "").partition(".")[0]
        self.send_legacy(["clientver=%s" % LEGACY_LATEST.get(family,
                                                              "2.2.1")])

    def is_admin_request(self):
        token = self.presented_token()
        return token is not None and hmac.compare_digest(
            token.encode(), self.farm.tokens["admin"].encode())


def openapi_document():
    """Return the OpenAPI 3 description of the JSON API."""
    error = {"description": "error", "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/Error"}}}}

    def reply(description, schema=None, media="application/json"):
        schema = schema or {"type": "object"}
        return {"description": description,
                "content": {media: {"schema": schema}}}

    def errors(*codes):
        # Any request may fail authentication, name an unknown id or use
        # a method the path does not have.
        return {str(code): error for code in codes + (401, 404, 405)}

    def json_body(properties, required=()):
        schema = {"type": "object", "properties": properties}
        if required:
            schema["required"] = list(required)
        return {"required": True, "content": {"application/json": {
            "schema": schema}}}

    def path_id(name):
        return {"name": name, "in": "path", "required": True,
                "schema": {"type": "integer", "minimum": 0,
                           "maximum": 999999999999999999}}

    zip_body = {"required": True, "description": "a zip archive",
                "content": {"application/octet-stream": {
                    "schema": {"type": "string", "format": "binary"}}}}
    text = {"type": "string"}
    whole = {"type": "integer"}
    job_query = [{"name": name, "in": "query", "schema": text}
                 for name in JOB_OPTION_NAMES]
    job_query.append({"name": "option", "in": "query", "schema": {
        "type": "array", "items": text}, "style": "form",
        "explode": True, "description": "a POV-Ray option, repeatable"})
    job_path = [path_id("job")]
    task_path = [path_id("task")]
    operations = {
        "/api/jobs": {
            "get": {"summary": "List jobs", "responses": dict(
                errors(), **{"200": reply("jobs")})},
            "post": {"summary": "Submit a job archive",
                     "parameters": job_query, "requestBody": zip_body,
                     "responses": dict(errors(400, 411, 413),
                                       **{"201": reply("the new job")})}},
        "/api/jobs/{job}": {
            "parameters": job_path,
            "get": {"summary": "Show a job", "responses": dict(
                errors(404), **{"200": reply("the job")})},
            "post": {"summary": "Change priority or max workers",
                     "requestBody": json_body({"priority": whole,
                                               "max_workers": whole}),
                     "responses": dict(errors(400, 404, 411, 413),
                                       **{"200": reply("the job")})},
            "delete": {"summary": "Delete a job", "responses": dict(
                errors(404), **{"200": reply("deleted")})}},
        "/api/jobs/{job}/{action}": {
            "parameters": job_path + [{
                "name": "action", "in": "path", "required": True,
                "schema": {"type": "string", "enum": list(JOB_ACTIONS)}}],
            "post": {"summary": "Pause, resume, cancel, retry or delete",
                     "responses": dict(errors(404, 409),
                                       **{"200": reply("new state")})}},
        "/api/jobs/{job}/tasks": {
            "parameters": job_path + [{
                "name": "limit", "in": "query", "schema": {
                    "type": "integer", "minimum": 1,
                    "maximum": MAX_LISTED_TASKS}}],
            "get": {"summary": "List a job's tasks", "responses": dict(
                errors(400, 404), **{"200": reply("tasks")})}},
        "/api/jobs/{job}/frames/{frame}.png": {
            "parameters": job_path + [{
                "name": "frame", "in": "path", "required": True,
                "schema": {"type": "integer", "minimum": -999999999,
                           "maximum": 999999999}}],
            "get": {"summary": "Download a finished frame",
                    "responses": dict(errors(404), **{"200": reply(
                        "PNG", {"type": "string", "format": "binary"},
                        "image/png")})}},
        "/api/jobs/{job}/frames.zip": {
            "parameters": job_path,
            "get": {"summary": "Download all finished frames",
                    "responses": dict(errors(404), **{"200": reply(
                        "zip", {"type": "string", "format": "binary"},
                        "application/zip")})}},
        "/api/jobs/{job}/preview/{frame}.png": {
            "parameters": job_path + [{
                "name": "frame", "in": "path", "required": True,
                "schema": {"type": "integer", "minimum": -999999999,
                           "maximum": 999999999}}],
            "get": {"summary": "Download a frame as far as it is rendered",
                    "responses": dict(errors(), **{"200": reply(
                        "PNG", {"type": "string", "format": "binary"},
                        "image/png")})}},
        "/api/jobs/{job}/animation.png": {
            "parameters": job_path,
            "get": {"summary": "Download an animated PNG preview",
                    "responses": dict(errors(404), **{"200": reply(
                        "animated PNG", {"type": "string",
                                         "format": "binary"},
                        "image/apng")})}},
        "/api/jobs/{job}/animation.mp4": {
            "parameters": job_path,
            "get": {"summary": "Download an MP4 of the finished frames "
                    "(when ffmpeg is installed on the server)",
                    "responses": dict(errors(404, 500, 503), **{
                        "200": reply("MP4", {"type": "string",
                                             "format": "binary"},
                                     "video/mp4")})}},
        "/api/workers": {
            "get": {"summary": "List workers", "responses": dict(
                errors(), **{"200": reply("workers")})},
            "post": {"summary": "Register a worker",
                     "requestBody": json_body({"name": text, "group": text,
                                               "host": text}),
                     "responses": dict(errors(400, 411, 413),
                                       **{"201": reply("worker id")})}},
        "/api/claim": {
            "post": {"summary": "Lease the next task",
                     "requestBody": json_body({"worker": whole},
                                              ["worker"]),
                     "responses": dict(errors(400, 404, 411, 413, 503),
                                       **{"200": reply("a task or none")})}},
        "/api/archives/{archive}.zip": {
            "parameters": [{"name": "archive", "in": "path",
                            "required": True, "schema": {
                                "type": "string",
                                "pattern": "^[0-9a-f]{64}$"}}],
            "get": {"summary": "Download a job archive",
                    "responses": dict(errors(404), **{"200": reply(
                        "zip", {"type": "string", "format": "binary"},
                        "application/zip")})}},
        "/api/tasks/{task}": {
            "parameters": task_path,
            "get": {"summary": "Show a task with the end of POV-Ray's "
                    "output", "responses": dict(errors(404), **{
                        "200": reply("the task")})}},
        "/api/tasks/{task}/heartbeat": {
            "parameters": task_path,
            "post": {"summary": "Renew a lease",
                     "requestBody": json_body(
                         {"attempt": text, "worker": whole,
                          "progress": {"type": "number"}},
                         ["attempt", "worker"]),
                     "responses": dict(errors(400, 404, 409, 411, 413, 503),
                                       **{"200": reply("continue or stop")})}},
        "/api/tasks/{task}/result": {
            "parameters": task_path + [{
                "name": "attempt", "in": "query", "required": True,
                "schema": text}],
            "post": {"summary": "Deliver a result archive",
                     "requestBody": zip_body,
                     "responses": dict(errors(400, 409, 411, 413, 503),
                                       **{"200": reply("accepted")})}},
        "/api/tasks/{task}/fail": {
            "parameters": task_path,
            "post": {"summary": "Report a failed attempt",
                     "requestBody": json_body(
                         {"attempt": text, "error": text, "log": text},
                         ["attempt"]),
                     "responses": dict(errors(400, 409, 411, 413, 503),
                                       **{"200": reply("recorded")})}},
        "/api/tasks/{task}/release": {
            "parameters": task_path,
            "post": {"summary": "Give a task back",
                     "requestBody": json_body({"attempt": text},
                                              ["attempt"]),
                     "responses": dict(errors(400, 409, 411, 413, 503),
                                       **{"200": reply("released")})}},
    }
    return {
        "openapi": "3.0.3",
        "info": {"title": "httpov", "version": __version__,
                 "description": "The JSON API of the httpov render farm. "
                 "The admin token may call everything; the worker token "
                 "registers workers, claims tasks, downloads archives and "
                 "delivers results."},
        "paths": operations,
        "components": {
            "securitySchemes": {"token": {"type": "http",
                                          "scheme": "bearer"}},
            "schemas": {"Error": {"type": "object", "required": ["error"],
                                  "properties": {"error": text}}},
        },
        "security": [{"token": []}],
    }


PAGE_POLICY = ("default-src 'none'; script-src 'self'; connect-src 'self'; "
               "img-src 'self'; style-src 'unsafe-inline'; form-action "
               "'self'; frame-ancestors 'none'; base-uri 'none'")
MAX_GRID_TASKS = 5000             # tasks shown in a job page's grid
MAX_LISTED_TASKS = 100000         # tasks in one response of the tasks API
MAX_FORM_PARTS = 64               # fields of a multipart form
MULTIPART_TYPE = re.compile(r"(?i)^multipart/form-data;.*?\bboundary="
                            r"\"?([^\";]+)")
STALE_WORKER_SECONDS = 30         # a worker polls or beats every 10 s
TASK_COLOURS = {"queued": "#ccc", "leased": "#e9b949", "done": "#3a7",
                "failed": "#c33"}
PAGE_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
th, td { padding: 0.3em 0.7em; border-bottom: 1px solid #ddd;
         text-align: left; vertical-align: top; }
.bar { width: 12em; height: 0.9em; background: #eee; }
.bar div { height: 100%; background: #3a7; }
.error { color: #a22; }
.grid a { display: inline-block; width: 0.8em; height: 0.8em;
             margin: 1px; }
img.thumb { width: 160px; margin: 2px; border: 1px solid #ccc; }
pre { background: #f4f4f4; padding: 0.5em; max-height: 20em;
      overflow: auto; }
img.preview { width: 320px; border: 1px solid #ccc; }
.live { color: #777; font-size: small; }
"""
PAGE_REFRESH_SECONDS = 5          # reload of pages without JavaScript
PAGE_POLL_MS = 3000               # how often page scripts ask the API
MAX_THUMBNAILS = 48               # finished frames shown on a job page
MAX_FAILED_SHOWN = 20             # failed tasks shown on a job page
MAX_LOG_SHOWN = 4000              # characters of a failed task's log
# The pages' script: it requests fresh data from the JSON API and rewrites
# the parts of the page that change, with textContent only, so no name from a
# job or worker is ever read as HTML. The pages work without it.
PAGE_SCRIPT = r"""
"use strict";
(function () {
  var POLL_MS = %(poll_ms)d;
  var COLOURS = %(colours)s;
  var MAX_THUMBNAILS = %(thumbnails)d;
  var MAX_FAILED = %(failed)d;
  var MAX_LOG = %(log)d;
  var MAX_GRID = %(grid)d;
  var polls = 0;
  var hasMp4 = document.documentElement.querySelector("body[data-mp4]");

  function node(tag, text, attributes) {
    var element = document.createElement(tag);
    if (text !== undefined && text !== null) {
      element.textContent = String(text);
    }
    Object.keys(attributes || {}).forEach(function (name) {
      element.setAttribute(name, attributes[name]);
    });
    return element;
  }

  function cell(row, content) {
    var td = row.insertCell(-1);
    if (content instanceof Node) {
      td.appendChild(content);
    } else {
      td.textContent = content;
    }
    return td;
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined) {
      return "-";
    }
    seconds = Math.floor(seconds);
    function two(n) { return (n < 10 ? "0" : "") + n; }
    if (seconds >= 3600) {
      return Math.floor(seconds / 3600) + "h " +
        two(Math.floor(seconds %% 3600 / 60)) + "m";
    }
    if (seconds >= 60) {
      return Math.floor(seconds / 60) + "m " + two(seconds %% 60) + "s";
    }
    return seconds + "s";
  }

  function percent(job) {
    return 100 * job.progress;
  }

  function bar(job) {
    var outer = node("span");
    var frame = node("div", null, {"class": "bar"});
    var fill = node("div");
    fill.style.width = percent(job).toFixed(1) + "%%";
    frame.appendChild(fill);
    outer.appendChild(frame);
    outer.appendChild(document.createTextNode(
      percent(job).toFixed(0) + "%%"));
    return outer;
  }

  function downloads(job, hasMp4) {
    var span = node("span");
    var links = [];
    if (job.frames_done) {
      links.push(["frames.zip", "all frames (zip)"]);
    }
    if (job.frames_done > 1) {
      links.push(["animation.png", "animated PNG"]);
      if (hasMp4) {
        links.push(["animation.mp4", "MP4"]);
      }
    }
    links.forEach(function (link, index) {
      if (index) {
        span.appendChild(document.createTextNode(" "));
      }
      span.appendChild(node("a", link[1], {
        href: "/api/jobs/" + job.id + "/" + link[0]}));
    });
    return span;
  }

  function ask(path, options) {
    options = options || {credentials: "same-origin", cache: "no-store"};
    return fetch(path, options)
      .then(function (response) {
        return response.json().then(function (value) {
          if (!response.ok) {
            throw new Error(value.error || "HTTP " + response.status);
          }
          return value;
        });
      });
  }

  function showLive(error) {
    var live = document.getElementById("live");
    live.textContent = error ? "Updates paused: " + error.message :
      "Updated " + new Date().toLocaleTimeString() + ".";
    live.setAttribute("data-polls", String(polls));
  }

  function fillJobs(jobs, hasMp4) {
    var body = document.getElementById("jobs");
    body.textContent = "";
    if (!jobs.length) {
      cell(body.insertRow(-1), "No jobs yet.").colSpan = 9;
    }
    jobs.forEach(function (job) {
      var row = body.insertRow(-1);
      cell(row, node("a", job.id, {href: "/jobs/" + job.id}));
      var name = cell(row, job.name);
      if (job.error) {
        name.appendChild(node("div", job.error, {"class": "error"}));
      }
      cell(row, job.state);
      cell(row, bar(job));
      cell(row, job.frames_done + " / " + job.frames);
      cell(row, job.tasks_done + " / " + job.tasks + " (" +
           job.tasks_running + " running)");
      cell(row, duration(job.elapsed_seconds));
      cell(row, duration(job.left_seconds));
      cell(row, downloads(job, hasMp4));
    });
  }

  function fillWorkers(workers) {
    var body = document.getElementById("workers");
    body.textContent = "";
    if (!workers.length) {
      cell(body.insertRow(-1), "No workers yet.").colSpan = 8;
    }
    workers.forEach(function (worker) {
      var row = body.insertRow(-1);
      [worker.id, worker.name, worker.group, worker.state,
       worker.task === null ? "" : worker.task, worker.tasks_done,
       duration(worker.average_seconds),
       worker.last_seen_seconds.toFixed(0) + " s ago"
      ].forEach(function (value) { cell(row, value); });
    });
  }

  function pollStatus() {
    return Promise.all([ask("/api/jobs"), ask("/api/workers")])
      .then(function (answers) {
        fillJobs(answers[0].jobs, hasMp4);
        fillWorkers(answers[1].workers);
      });
  }

  function gridTitle(task) {
    return "task " + task.id + ": frames " + task.frame_first + "-" +
      task.frame_last + ", rows " + task.row_first + "-" + task.row_last +
      ", " + task.state;
  }

  function fillJob(job, tasks, hasMp4) {
    var summary = document.getElementById("summary");
    summary.textContent = "State ";
    summary.appendChild(node("b", job.state));
    summary.appendChild(document.createTextNode(
      ", " + percent(job).toFixed(0) + "%% done, tasks " + job.tasks_done +
      " / " + job.tasks + ", frames " + job.frames_done + " / " +
      job.frames + ", " + job.width + "x" + job.height + ", elapsed " +
      duration(job.elapsed_seconds) + ", about " +
      duration(job.left_seconds) + " left."));
    document.getElementById("error").textContent = job.error || "";

    var grid = document.getElementById("grid");
    grid.textContent = "";
    tasks.slice(0, MAX_GRID).forEach(function (task) {
      var cell = node("a", null, {
        title: gridTitle(task),
        href: "/jobs/" + job.id + "/tasks/" + task.id});
      cell.style.background = COLOURS[task.state] || "#888";
      grid.appendChild(cell);
    });

    var preview = document.getElementById("preview");
    var frame = job.preview_frame;
    if (frame !== null) {
      var image = preview.querySelector("img");
      if (!image) {
        preview.textContent = "";
        preview.appendChild(node("h2"));
        image = node("img", null, {"class": "preview"});
        preview.appendChild(image);
      }
      preview.querySelector("h2").textContent =
        "Frame " + frame + " in progress";
      image.alt = "frame " + frame + " so far";
      image.src = "/api/jobs/" + job.id + "/preview/" + frame +
        ".png?poll=" + polls;
    } else {
      preview.textContent = "";
    }

    var links = document.getElementById("downloads");
    links.textContent = "";
    links.appendChild(downloads(job, hasMp4));
    var frames = document.getElementById("frames");
    var shown = {};
    Array.prototype.forEach.call(frames.querySelectorAll("img"),
      function (image) { shown[image.getAttribute("data-frame")] = 1; });
    job.done_frames.slice(0, MAX_THUMBNAILS).forEach(function (frame) {
      if (shown[String(frame)]) {
        return;
      }
      var path = "/api/jobs/" + job.id + "/frames/" + frame + ".png";
      var link = node("a", null, {href: path});
      link.appendChild(node("img", null, {
        "class": "thumb", alt: "frame " + frame, src: path,
        "data-frame": String(frame)}));
      frames.appendChild(link);
    });

    var failed = document.getElementById("failed");
    failed.textContent = "";
    job.failed_tasks.slice(0, MAX_FAILED).forEach(function (task) {
      failed.appendChild(node("h3", "Failed task " + task.id +
                              " (worker " + task.failed_worker + ")"));
      failed.appendChild(node("p", task.error || "", {"class": "error"}));
      failed.appendChild(node("pre", (task.log || "").slice(-MAX_LOG)));
    });
  }

  function pollJob(id) {
    return Promise.all([
      ask("/api/jobs/" + id),
      ask("/api/jobs/" + id + "/tasks?limit=" + MAX_GRID)
    ]).then(function (answers) {
      fillJob(answers[0], answers[1].tasks, hasMp4);
    });
  }

  function refresh() {
    var job = document.body.getAttribute("data-job");
    var update = job ? pollJob(job) :
      document.getElementById("jobs") ? pollStatus() : null;
    if (!update) {
      return null;
    }
    return update.then(function () {
      polls += 1;
      showLive(null);
    }, showLive);
  }

  function poll() {
    var update = refresh();
    if (update) {
      update.then(function () { setTimeout(poll, POLL_MS); });
    }
  }

  function send(path, options, form) {
    options.method = "POST";
    options.credentials = "same-origin";
    options.headers = options.headers || {};
    options.headers["X-CSRF-Token"] = form.elements.csrf.value;
    return ask(path, options);
  }

  // The forms work without this script; with it, they use the JSON API
  // and the page stays where it is.
  function controlJob(event) {
    var form = event.target;
    var job = document.body.getAttribute("data-job");
    var action = event.submitter ? event.submitter.value : "update";
    var done;
    event.preventDefault();
    if (action === "delete" &&
        !confirm("Delete job " + job + " and all its frames?")) {
      return;
    }
    if (action === "update") {
      var priority = form.elements.priority.value.trim();
      var workers = form.elements.max_workers.value.trim();
      if (!/^-?[0-9]{1,7}$/.test(priority) || !/^[0-9]{1,7}$/.test(workers)) {
        document.getElementById("live").textContent =
          "Priority and max workers must be whole numbers.";
        return;
      }
      done = send("/api/jobs/" + job, {
        headers: {"Content-Type": "application/json"},
        body: JSON.stringify({priority: Number(priority),
                              max_workers: Number(workers)})}, form);
    } else {
      done = send("/api/jobs/" + job + "/" + action, {}, form);
    }
    done.then(function () {
      if (action === "delete") {
        location.href = "/";
      } else {
        refresh();
      }
    }, function (error) {
      document.getElementById("live").textContent =
        action + " failed: " + error.message;
    });
  }

  function submitJob(event) {
    var form = event.target;
    event.preventDefault();
    send("/api/jobs", {body: new FormData(form)}, form)
      .then(function (job) {
        location.href = "/jobs/" + job.id;
      }, function (error) {
        document.getElementById("live").textContent =
          "Submit failed: " + error.message;
      });
  }

  document.addEventListener("DOMContentLoaded", function () {
    Array.prototype.forEach.call(
      document.querySelectorAll("form.control"),
      function (form) { form.addEventListener("submit", controlJob); });
    var submit = document.getElementById("submit");
    if (submit) {
      submit.addEventListener("submit", submitJob);
    }
    poll();
  });
})();
""" % {"poll_ms": PAGE_POLL_MS, "colours": json.dumps(TASK_COLOURS),
       "thumbnails": MAX_THUMBNAILS, "failed": MAX_FAILED_SHOWN,
       "log": MAX_LOG_SHOWN, "grid": MAX_GRID_TASKS}


def grid_title(task):
    return "task %d: frames %d-%d, rows %d-%d, %s" % (
        task["id"], task["frame_first"], task["frame_last"],
        task["row_first"], task["row_last"], task["state"])


def ffmpeg_path():
    """Return the ffmpeg program of the server, or None."""
    return shutil.which("ffmpeg")


def format_seconds(seconds):
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds >= 3600:
        return "%dh %02dm" % (seconds // 3600, seconds % 3600 // 60)
    if seconds >= 60:
        return "%dm %02ds" % (seconds // 60, seconds % 60)
    return "%ds" % seconds


def job_timing(job, now):
    """Return (elapsed seconds, estimated seconds left) of a job."""
    if not job["started"]:
        return None, None
    end = job["finished"] or now
    elapsed = end - job["started"]
    done = job["progress"]
    if job["finished"] or not done or job["state"] not in ACTIVE_JOB_STATES:
        return elapsed, None
    return elapsed, elapsed / done * (1 - done)


def render_submit_page(csrf):
    """Return the HTML of the submit page."""
    fields = "".join(
        "<p><label>%s <input name='%s'></label></p>" % (label, name)
        for name, label in (
            ("name", "Name"), ("frames", "Frames (FIRST-LAST)"),
            ("slices", "Slices per frame"),
            ("rows_per_slice", "or rows per slice"),
            ("frames_per_task", "Frames per task (empty: adaptive)"),
            ("max_workers", "Max workers (0: no limit)"),
            ("priority", "Priority"),
            ("scene", "Scene or INI inside the zip"),
            ("povray_options", "POV-Ray options (+W640 +H480 ...)")))
    return (page_head("httpov: submit", refresh=False)
            + "<p><a href='/'>all jobs</a></p><h1>Submit a job</h1>"
            "<form method='post' action='/submit' id='submit' "
            "enctype='multipart/form-data'>"
            "<input type='hidden' name='csrf' value='%s'>"
            "<p><label>Scene: a .zip of the job folder, or one .pov or .ini "
            "<input type='file' name='file' accept='.zip,.pov,.ini'>"
            "</label></p>%s<p><button>Submit</button></p></form>"
            "</body></html>" % (html.escape(csrf), fields))


def parse_multipart(path, boundary, file_target, max_file_bytes,
                    file_field="file"):
    """Parse a multipart/form-data body stored in ``path``.

    The part named ``file_field`` is streamed to ``file_target``; the
    other fields are returned as text. Returns (fields, uploaded file
    name).
    """
    delimiter = b"\r\n--" + boundary
    fields = {}
    file_name = None
    parts = 0
    with open(path, "rb") as source:
        buffer = b"\r\n" + source.read(COPY_CHUNK_BYTES)
        start = buffer.find(delimiter)
        if start < 0:
            raise UserError("multipart body has no boundary")
        buffer = buffer[start + len(delimiter):]
        while True:
            while len(buffer) < 4:
                more = source.read(COPY_CHUNK_BYTES)
                if not more:
                    raise UserError("multipart body is truncated")
                buffer += more
            if buffer.startswith(b"--"):
                return fields, file_name
            if not buffer.startswith(b"\r\n"):
                raise UserError("multipart body is malformed")
            buffer = buffer[2:]
            while b"\r\n\r\n" not in buffer:
                more = source.read(COPY_CHUNK_BYTES)
                if not more or len(buffer) > MAX_HEADER_BYTES:
                    raise UserError("multipart part headers are malformed")
                buffer += more
            head, buffer = buffer.split(b"\r\n\r\n", 1)
            parts += 1
            if parts > MAX_FORM_PARTS:
                raise UserError("multipart body has more than %d parts"
                                % MAX_FORM_PARTS)
            disposition = ""
            for line in head.decode("utf-8", "replace").split("\r\n"):
                if line.lower().startswith("content-disposition:"):
                    disposition = line
            name_match = re.search(r'\bname="([^"]*)"', disposition)
            file_match = re.search(r'\bfilename="([^"]*)"', disposition)
            name = name_match.group(1) if name_match else ""
            is_file = name == file_field
            limit = max_file_bytes if is_file else MAX_JSON_BYTES
            written = 0
            out = open(file_target, "wb") if is_file else io.BytesIO()
            with out:
                while True:
                    end = buffer.find(delimiter)
                    if end >= 0:
                        piece, buffer = buffer[:end], buffer[end +
                                                             len(delimiter):]
                    else:
                        keep = len(delimiter)
                        piece, buffer = buffer[:-keep], buffer[-keep:]
                    written += len(piece)
                    if written > limit:
                        raise TooLarge("form field %r is larger than %d "
                                       "bytes" % (name, limit))
                    out.write(piece)
                    if end >= 0:
                        break
                    more = source.read(COPY_CHUNK_BYTES)
                    if not more:
                        raise UserError("multipart body is truncated")
                    buffer += more
                if is_file:
                    file_name = file_match.group(1) if file_match else None
                    if not written:
                        file_name = None
                else:
                    fields[name] = out.getvalue().decode("utf-8", "replace")


def page_head(title, data="", refresh=True):
    """Return the start of a page: the script, a refresh for browsers
    without JavaScript, and the body tag with the page's data."""
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'>%s"
            "<script src='/static/httpov.js' defer></script>"
            "<title>%s</title><style>%s</style></head><body%s%s>"
            "<p id='live' class='live'></p>"
            % ("<noscript><meta http-equiv='refresh' content='%d'>"
               "</noscript>" % PAGE_REFRESH_SECONDS if refresh else "",
               html.escape(title), PAGE_STYLE, data,
               " data-mp4='1'" if ffmpeg_path() else ""))


def job_links(job):
    """Return the download links of a job's finished frames."""
    links = []
    if job["frames_done"]:
        links.append("<a href='/api/jobs/%d/frames.zip'>all frames (zip)"
                     "</a>" % job["id"])
    if job["frames_done"] > 1:
        links.append("<a href='/api/jobs/%d/animation.png'>animated PNG</a>"
                     % job["id"])
        if ffmpeg_path():
            links.append("<a href='/api/jobs/%d/animation.mp4'>MP4</a>"
                         % job["id"])
    return " ".join(links)


def render_job_page(job, tasks, csrf):
    """Return the HTML of a job's page; every value is escaped."""
    escape = html.escape
    fraction = job["progress"]
    parts = [page_head("httpov job %d" % job["id"],
                       " data-job='%d'" % job["id"]),
             "<p><a href='/'>all jobs</a></p>",
             "<h1>Job %d: %s</h1>" % (job["id"], escape(job["name"])),
             "<p id='summary'>State <b>%s</b>, %.0f%% done, tasks %d / %d, "
             "frames %d / %d, %dx%d, elapsed %s, about %s left.</p>"
             % (escape(job["state"]), 100 * fraction, job["tasks_done"],
                job["tasks"],
                job["frames_done"], job["frames"], job["width"],
                job["height"], format_seconds(job["elapsed_seconds"]),
                format_seconds(job["left_seconds"]))]
    parts.append("<p id='error' class='error'>%s</p>"
                 % escape(job["error"] or ""))

    if csrf is not None:
        parts.append(render_job_forms(job, csrf))

    parts.append("<h2>Tasks</h2><div id='grid' class='grid'>")
    for task in tasks:
        parts.append("<a href='/jobs/%d/tasks/%d' title='%s' "
                     "style='background:%s'></a>"
                     % (job["id"], task["id"], escape(grid_title(task)),
                        TASK_COLOURS.get(task["state"], "#888")))
    parts.append("</div>")

    frame = job["preview_frame"]
    preview = ""
    if frame is not None:
        preview = ("<h2>Frame %d in progress</h2><img class='preview' "
                   "alt='frame %d so far' src='/api/jobs/%d/preview/%d.png'>"
                   % (frame, frame, job["id"], frame))
    parts.append("<div id='preview'>%s</div>" % preview)

    parts.append("<h2>Finished frames</h2><p id='downloads'>%s</p>"
                 "<div id='frames'>" % job_links(job))
    for frame in job["done_frames"][:MAX_THUMBNAILS]:
        parts.append("<a href='/api/jobs/%d/frames/%d.png'><img "
                     "class='thumb' alt='frame %d' data-frame='%d' "
                     "src='/api/jobs/%d/frames/%d.png'></a>"
                     % (job["id"], frame, frame, frame, job["id"], frame))
    parts.append("</div><div id='failed'>")

    for task in job["failed_tasks"][:MAX_FAILED_SHOWN]:
        parts.append("<h3>Failed task %d (worker %s)</h3><p class='error'>"
                     "%s</p><pre>%s</pre>"
                     % (task["id"], escape(str(task["failed_worker"])),
                        escape(task["error"] or ""),
                        escape((task["log"] or "")[-MAX_LOG_SHOWN:])))
    parts.append("</div></body></html>")
    return "".join(parts)


def render_job_forms(job, csrf):
    """Return the job page's forms: actions, priority and max workers."""
    escape = html.escape
    parts = ["<form method='post' action='/jobs/%d/control' "
             "class='control'><input type='hidden' name='csrf' "
             "value='%s'>" % (job["id"], escape(csrf))]
    for action in JOB_ACTIONS:
        parts.append("<button name='action' value='%s'>%s</button> "
                     % (action, action))
    parts.append("</form><form method='post' action='/jobs/%d/control' "
                 "class='control'><input type='hidden' name='csrf' "
                 "value='%s'>"
                 "Priority <input name='priority' value='%d' size='5'> "
                 "Max workers <input name='max_workers' value='%d' "
                 "size='5'> <button name='action' value='update'>set"
                 "</button></form>"
                 % (job["id"], escape(csrf), job["priority"],
                    job["max_workers"]))
    return "".join(parts)


def render_task_page(job, task):
    """Return the HTML of one task's page: its state and POV-Ray's log."""
    escape = html.escape
    rows = [("State", task["state"]),
            ("Frames", "%d-%d" % (task["frame_first"], task["frame_last"])),
            ("Rows", "%d-%d" % (task["row_first"], task["row_last"])),
            ("Attempts", task["attempts"]),
            ("Worker", task["worker_id"] or task["failed_worker"] or "-"),
            ("Progress", "%.0f%%" % (100 * task["progress"])),
            ("Error", task["error"] or "-")]
    table = "".join("<tr><th>%s</th><td>%s</td></tr>"
                    % (name, escape(str(value))) for name, value in rows)
    return (page_head("httpov task %d" % task["id"])
            + "<p><a href='/jobs/%d'>job %d: %s</a></p>"
            "<h1>Task %d</h1><table>%s</table><h2>POV-Ray output (end)"
            "</h2><pre>%s</pre></body></html>"
            % (job["id"], job["id"], escape(job["name"]), task["id"], table,
               escape((task["log"] or "no output recorded")
                      [-MAX_LOG_SHOWN:])))


def render_login_page(problem=""):
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'>"
            "<title>httpov</title></head><body><h1>httpov</h1>"
            "<p>%s Open the login link that <code>httpov.py serve</code> "
            "printed (it ends in <code>/?token=...</code>).</p>"
            "</body></html>" % html.escape(problem))


def render_status_page(jobs, workers):
    """Return the HTML of the status page; every value is escaped."""
    escape = html.escape
    parts = [page_head("httpov status", " data-page='status'"),
             "<h1>httpov</h1><p><a href='/submit'>Submit a job</a></p>"
             "<h2>Jobs</h2><table><thead><tr><th>Job</th><th>Name</th>"
             "<th>State</th><th>Progress</th><th>Frames</th><th>Tasks</th>"
             "<th>Elapsed</th><th>Left (about)</th><th>Downloads</th></tr>"
             "</thead><tbody id='jobs'>"]
    if not jobs:
        parts.append("<tr><td colspan='9'>No jobs yet. Submit one with "
                     "<code>httpov.py submit</code>.</td></tr>")
    for job in jobs:
        fraction = job["progress"]
        error = ("<div class='error'>%s</div>" % escape(job["error"])
                 if job["error"] else "")
        parts.append(
            "<tr><td><a href='/jobs/%d'>%d</a></td><td>%s%s</td><td>%s</td>"
            "<td><div class='bar'><div style='width:%.1f%%'></div></div>"
            "%.0f%%</td><td>%d / %d</td><td>%d / %d (%d running)</td>"
            "<td>%s</td><td>%s</td><td>%s</td></tr>"
            % (job["id"], job["id"], escape(job["name"]), error,
               escape(job["state"]), 100 * fraction, 100 * fraction,
               job["frames_done"], job["frames"], job["tasks_done"],
               job["tasks"], job["tasks_running"],
               format_seconds(job["elapsed_seconds"]),
               format_seconds(job["left_seconds"]), job_links(job)))
    parts.append("</tbody></table><h2>Workers</h2><table><thead><tr>"
                 "<th>Worker</th><th>Name</th><th>Group</th><th>State</th>"
                 "<th>Task</th><th>Tasks done</th><th>Average task</th>"
                 "<th>Last seen</th></tr></thead><tbody id='workers'>")
    if not workers:
        parts.append("<tr><td colspan='8'>No workers yet. Start one with "
                     "<code>httpov.py work URL</code>.</td></tr>")
    for worker in workers:
        parts.append(
            "<tr><td>%d</td><td>%s</td><td>%s</td><td>%s</td>"
            "<td>%s</td><td>%d</td><td>%s</td><td>%.0f s ago</td></tr>"
            % (worker["id"], escape(worker["name"]),
               escape(worker["group"]), worker["state"],
               escape(str(worker["task"] or "")), worker["tasks_done"],
               format_seconds(worker["average_seconds"]),
               worker["last_seen_seconds"]))
    parts.append("</tbody></table></body></html>")
    return "".join(parts)


# ===========================================================================
# 7. Old clients: the HTTPov 0.9 protocol
# ===========================================================================
#
# Machines that still run the original HTTPov clients (Bash client 1.2,
# Python client 2.2.1) render for httpov unchanged. Their protocol is one
# URL, /httpov.php, with the command and its parameters in the query
# string. Replies are "key=value" lines that the clients read by position,
# so the order of the lines is part of the protocol. This section maps it
# onto the farm. A client "hostname:cid" is a worker, and a batch number is
# one attempt of one task. Frames are counted from 0. An upload (zipped PNG
# frames or PPM slices) is turned into an ordinary result. The protocol is
# closed unless serve opens it: under /legacy/<worker token>/, and at the
# root for the networks given to --legacy-clients.

LEGACY_LATEST = {"1": "1.2", "2": "2.2.1"}  # client family -> newest
LEGACY_PING_SECONDS = 60          # the clients' "active" interval
DEFAULT_LEGACY_LEASE_SECONDS = 150  # two missed pings and some slack
LEGACY_NAME_CHARS = 40            # of the job name in the archive name
LEGACY_INI = "pov.ini"            # the settings file the clients run
ZIP64_LIMIT_BYTES = (1 << 31) - 1  # larger zip members need Zip64
LEGACY_JOB_INI = "httpov-job.ini"  # a job's own pov.ini, renamed
LEGACY_FRAME = re.compile(r"^(?:.*/)?(?P<name>[^/]+)_(?P<frame>\d{1,9})"
                          r"\.png$")
LEGACY_SLICE = re.compile(r"^(?:.*/)?slice_\d{1,9}\.ppm$")
LEGACY_NO_WORKER = ("hello", "abort")  # commands that register no worker
LEGACY_REPORT = re.compile(r"^(?:.*/)?batchreport(?:_\d{1,9})?\.txt$")


def legacy_name(job):
    """Return the name old clients know a job by.

    It names the job's folder and archive on the client and is the base
    of POV-Ray's output names there, so it contains only safe characters
    and starts with the job id, never with a dash.
    """
    return "%d-%s" % (job["id"],
                      safe_file_name(job["name"])[:LEGACY_NAME_CHARS])


def legacy_can_render(job):
    """Tell whether old clients can render a job: their slices arrive as
    PPM files, which have no alpha channel."""
    settings = json.loads(job["settings"])
    return not (settings["alpha"] and len(json.loads(job["row_ranges"])) > 1)


def frame_clock(settings, frame):
    """Return POV-Ray's clock value for a frame of an animation."""
    span = settings["final_frame"] - settings["initial_frame"] + \
        int(settings["cyclic"])
    start, end = settings["initial_clock"], settings["final_clock"]
    if span == 0:
        return start
    return start + (frame - settings["initial_frame"]) * (end - start) / span


def legacy_layout(names, job):
    """Map the job's archive members onto the legacy archive.

    Returns ({member: name inside the job folder}, name of the job's INI
    there). pov.ini is the farm's: a job file of that name, in any case,
    is left out unless it is the job's INI, which is then renamed to a
    name that no other file has, in any case either.
    """
    root = job["root"]
    relative = {name: name[len(root):] for name in names
                if name.startswith(root) and not name.endswith("/")}
    taken = {path.lower() for path in relative.values()}
    ini = job["ini"]
    if ini and ini.lower() == LEGACY_INI:
        number = 1
        ini = LEGACY_JOB_INI
        while ini.lower() in taken:
            number += 1
            ini = LEGACY_JOB_INI.replace(".ini", "-%d.ini" % number)
    layout = {}
    for member, path in relative.items():
        if path.lower() == LEGACY_INI:
            if path != job["ini"]:
                continue
            path = ini
        layout[member] = path
    return layout, ini


def ini_value(text):
    return '"%s"' % text if " " in text else text


def legacy_pov_ini(job, ini):
    """Return the pov.ini that old clients run for a job.

    The clients count frames from 0, so the animation is restated as
    frames 0 to the frame count, with clocks chosen so that every frame
    gets the clock it has in the job. A still becomes frames 0 to 2, so
    that POV-Ray still numbers its output. The job's own INI and options
    come first and the farm's settings last, as on httpov's workers.
    """
    # NOTE: frame_number, initial_frame and final_frame still differ
    # from the job's, so a scene that reads them instead of clock renders
    # other pictures on old clients.
    settings = json.loads(job["settings"])
    count = job["frame_count"]
    if settings["animated"]:
        final_frame = count
        first_clock = frame_clock(settings, job["first_frame"])
        last_clock = frame_clock(settings, job["first_frame"] + count)
    else:
        final_frame = 2
        first_clock = last_clock = settings.get("clock", 0.0)
    lines = ["; httpov job %d %r, for HTTPov 0.9 clients"
             % (job["id"], printable(job["name"], 100))]
    if ini:
        lines.append(ini_value(ini))
    lines.extend(json.loads(job["povray_options"]))
    lines.extend([
        "Input_File_Name=" + ini_value(settings["input_file"]),
        "Width=%d" % settings["width"],
        "Height=%d" % settings["height"],
        "Output_File_Type=N",
        "Bits_Per_Color=%d" % settings["depth"],
        "Initial_Frame=0",
        "Final_Frame=%d" % final_frame,
        "Initial_Clock=%.17g" % first_clock,
        "Final_Clock=%.17g" % last_clock,
        "Cyclic_Animation=off",
    ])
    return "\n".join(lines) + "\n"


def write_legacy_archive(source_path, job, target):
    """Write the archive old clients download: the job's folder renamed
    to its legacy name, with pov.ini added."""
    name = legacy_name(job)
    with zipfile.ZipFile(source_path) as source, \
            atomic_output(target, ".zip") as out, \
            zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        layout, ini = legacy_layout(source.namelist(), job)
        archive.writestr(name + "/", b"")
        archive.writestr(name + "/" + LEGACY_INI, legacy_pov_ini(job, ini))
        for member in source.infolist():
            if member.filename not in layout:
                continue
            copy = zipfile.ZipInfo(name + "/" + layout[member.filename],
                                   member.date_time)
            copy.compress_type = zipfile.ZIP_DEFLATED
            copy.external_attr = 0o644 << 16
            with source.open(member) as data, \
                    archive.open(copy, "w", force_zip64=member.file_size >=
                                 ZIP64_LIMIT_BYTES) as written:
                shutil.copyfileobj(data, written, COPY_CHUNK_BYTES)


def read_legacy_log(archive, names):
    """Return POV-Ray's output that a client zipped with its images,
    MAX_LOG_BYTES at most."""
    left = MAX_LOG_BYTES
    parts = []
    for name in [name for name in names if LEGACY_REPORT.match(name)][:2]:
        with archive.open(name) as source:
            data = source.read(left)
        parts.append(data.decode("utf-8", "replace"))
        left -= len(data)
        if left <= 0:
            break
    return "".join(parts)


def legacy_slice_number(job, task):
    """Return the slice number old clients know a sliced task by: the
    index of its first slice, since merged slices keep that start."""
    first_rows = [rows[0] for rows in json.loads(job["row_ranges"])]
    return first_rows.index(task["row_first"])


def convert_legacy_upload(upload, job, task, target, temp_path,
                          max_result_bytes=MAX_RESULT_BYTES):
    """Turn an old client's upload into a result archive of httpov's
    own layout (see Farm.deliver), written to ``target``.

    Whole frames arrive as ``<name>_<frame>.png`` with frames counted
    from 0; a slice arrives as a full-size PPM, of which only the
    task's rows are kept. ``temp_path`` makes temporary files.
    """
    settings = json.loads(job["settings"])
    name = legacy_name(job)
    sliced = len(json.loads(job["row_ranges"])) > 1
    width, height = settings["width"], settings["height"]
    try:
        archive = zipfile.ZipFile(upload)
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        raise UserError("upload is not a valid zip file (%s)"
                        % describe_zip_error(error))
    scratch = temp_path()
    try:
        with archive, zipfile.ZipFile(target, "w") as result:
            names = archive.namelist()
            result.writestr("log.txt", read_legacy_log(archive, names))
            if sliced:
                expected = "%s_frame_%08d/slice_%04d.ppm" % (
                    name, task["frame_first"] - job["first_frame"],
                    legacy_slice_number(job, task))
                slices = [item for item in names if LEGACY_SLICE.match(item)]
                if len(slices) != 1 or not slices[0].endswith(expected):
                    raise UserError("expected one slice, %s, in the "
                                    "upload (it contains: %s)"
                                    % (expected, ", ".join(names[:20])))
                member = archive.getinfo(slices[0])
                copy_member(archive, member, scratch,
                            MAX_PPM_HEADER_BYTES + width * height * 6,
                            member_signature(archive, member))
                with open(scratch, "rb") as stream:
                    info = read_ppm_header(stream)
                if (info.width, info.height, info.depth) != \
                        (width, height, settings["depth"]):
                    raise ImageError("slice is a %s PPM, expected %dx%d "
                                     "with %d bits per channel"
                                     % (info.describe(), width, height,
                                        settings["depth"]))
                png = temp_path()
                try:
                    ppm_to_png(scratch, png, task["row_first"],
                               task["row_last"])
                    result.write(png, "slice.png")
                finally:
                    remove_quietly(png)
                return
            found = {}
            for item in names:
                match = LEGACY_FRAME.match(item)
                if match and match.group("name") == name:
                    found[int(match.group("frame"))] = item
            largest = largest_png_bytes(width, height, max_result_bytes)
            for frame in range(task["frame_first"], task["frame_last"] + 1):
                number = frame - job["first_frame"]
                if number not in found:
                    raise UserError("frame %d (%s_%d.png) is missing from "
                                    "the upload (it contains: %s)"
                                    % (number, name, number,
                                       ", ".join(names[:20])))
                copy_member(archive, archive.getinfo(found[number]),
                            scratch, largest, size=(width, height))
                result.write(scratch, "frames/%d.png" % frame)
    except UserError:
        raise
    except Exception as error:
        # As in copy_member: any failure to read the zip is the sender's.
        raise UserError("upload is a corrupt zip file (%s)"
                        % describe_zip_error(error))
    finally:
        remove_quietly(scratch)


def member_signature(archive, member):
    """Return the first two bytes of a member: P6 or P5 for a PPM."""
    with archive.open(member) as source:
        head = source.read(2)
    return head if head in (b"P6", b"P5") else b"P6"


class LegacyProtocol:
    """The commands of HTTPov 0.9 clients, run for one farm.

    Each method returns the reply lines in the order the clients read
    them. Nothing here raises to the client: an old client cannot read
    JSON, so problems become ``status=error`` or ``command=sleep`` and a
    line in the server log.
    """

    def __init__(self, farm, query, address):
        self.farm = farm
        self.query = query
        self.address = address
        self.client = self.value("client")[:100] or "unknown"
        self.worker_id = None

    def value(self, name):
        return (self.query.get(name) or [""])[0].strip()

    def number(self, name):
        text = self.value(name)
        if not re.match(r"^\d{1,18}$", text):
            raise UserError("parameter %s=%r is not a number"
                            % (name, text))
        return int(text)

    def run_command(self, upload=None):
        """Run the request's command; return the reply lines."""
        command = self.value("command")
        version = self.value("version")
        family, _, level = version.partition(".")
        if not version or family == "0":
            return ["command=sleep",
                    "message=HTTPov client %s is too old for this server; "
                    "install client 1.2 or 2.2.1, or httpov.py"
                    % (version or "(no version)")]
        handler = getattr(self, "command_" + command, None)
        if command not in LEGACY_COMMANDS or handler is None:
            return ["command=unknown"]
        try:
            if command not in LEGACY_NO_WORKER:
                self.worker_id = self.farm.db.legacy_worker(
                    self.client, self.value("cgroup")[:100], self.address,
                    time.time())
            return handler(level, upload)
        except (UserError, DatabaseBusy) as error:
            server_log.warning("legacy client %a (worker %s): %s: %s",
                               self.client, self.worker_id, command,
                               printable(str(error)))
            if command in ("getjob", "getbatch"):
                return ["command=sleep"]
            return ["status=error"]

    def command_hello(self, level, upload):
        return ["message=httpov %s ready." % __version__]

    def command_abort(self, level, upload):
        return []

    def command_getjob(self, level, upload):
        job = self.farm.db.claimable_job(self.worker_id, time.time(),
                                         legacy_can_render)
        if job is None:
            return ["command=sleep"]
        server_log.info("legacy client %a (worker %d): job %d",
                        self.client, self.worker_id, job["id"])
        lines = ["command=getbatch", "job=%d" % job["id"],
                 "name=" + legacy_name(job),
                 "frames=%d" % job["frame_count"]]
        if version_tuple(level) < (2,):
            lines.append("message=this HTTPov client is old; client %s "
                         "renders better" % LEGACY_LATEST.get(
                             self.value("version").partition(".")[0],
                             "1.2"))
        return lines

    def command_getbatch(self, level, upload):
        job_id = self.number("job")
        claimed = self.farm.db.claim_task(
            self.worker_id, time.time(), self.farm.legacy_lease_seconds,
            lambda job: job["id"] == job_id and legacy_can_render(job))
        if claimed is None:
            try:
                job = self.farm.db.job(job_id)
            except NotFound:
                return ["command=getjob"]
            counts = self.farm.db.task_counts(job_id)
            if job["state"] in ACTIVE_JOB_STATES and \
                    not counts["queued"] and counts["leased"] and \
                    self.farm.db.claimable_job(
                        self.worker_id, time.time(),
                        legacy_can_render) is None:
                # Only running tasks are left, and one may come back:
                # stay in the job. A job whose queued tasks this client
                # may not take (max workers) is busy: leave it.
                return ["command=sleep"]
            return ["command=getjob"]
        task, job = claimed
        batch = self.farm.db.add_legacy_batch(task["id"], task["attempt"],
                                              self.worker_id, time.time())
        server_log.info("job %d task %d: leased to legacy client %a "
                        "(worker %d) as batch %d", job["id"], task["id"],
                        self.client, self.worker_id, batch)
        lines = ["command=render", "batch=%d" % batch,
                 "startframe=%d" % (task["frame_first"] - job["first_frame"]),
                 "stopframe=%d" % (task["frame_last"] - job["first_frame"])]
        if len(json.loads(job["row_ranges"])) > 1:
            lines.extend(["slice=%d" % legacy_slice_number(job, task),
                          "startrow=%d" % task["row_first"],
                          "endrow=%d" % task["row_last"]])
        return lines

    def batch(self):
        """Return the legacy batch named by the request, checked against
        its job and client."""
        batch = self.farm.db.legacy_batch(self.number("batch"))
        task = self.farm.db.task(batch["task_id"])
        if task["job_id"] != self.number("job") or \
                batch["worker_id"] != self.worker_id:
            raise Conflict("batch %d belongs to another job or client"
                           % batch["id"])
        return batch, task

    def command_active(self, level, upload):
        batch, task = self.batch()
        self.farm.db.heartbeat(task["id"], batch["attempt"], self.worker_id,
                               0.0, time.time(),
                               self.farm.legacy_lease_seconds)
        return ["status=ok"]

    def command_abortbatch(self, level, upload):
        batch, task = self.batch()
        self.farm.db.fail_task(task["id"], batch["attempt"],
                               "the HTTPov client %s gave the batch up"
                               % self.client, "", time.time())
        server_log.warning("job %d task %d: legacy client %a gave batch "
                           "%d up", task["job_id"], task["id"], self.client,
                           batch["id"])
        return ["status=ok"]

    def command_postbatch(self, level, upload):
        if upload is None:
            raise UserError("postbatch without a file in field filedata")
        batch, task = self.batch()
        job = self.farm.db.job(task["job_id"])
        converted = self.farm.temp_path(".zip")
        try:
            try:
                convert_legacy_upload(upload, job, task, converted,
                                      lambda: self.farm.temp_path(".tmp"),
                                      self.farm.max_result_bytes)
                self.farm.deliver(task["id"], batch["attempt"], converted)
            except Conflict:
                raise
            except UserError as error:
                # The render is unusable: give the task to another
                # attempt now instead of when the lease runs out.
                self.farm.db.fail_task(task["id"], batch["attempt"],
                                       "upload of HTTPov client %s: %s"
                                       % (self.client, error), "",
                                       time.time())
                raise
        finally:
            remove_quietly(converted)
        return ["status=ok"]


LEGACY_COMMANDS = ("hello", "getjob", "getbatch", "postbatch", "abortbatch",
                   "active", "abort")


def version_tuple(text):
    """Turn "2.1" into (2, 1); parts that are not numbers count as 0."""
    return tuple(int(part) if part.isdigit() and len(part) < 10 else 0
                 for part in text.split(".")[:10] if part != "")


# ===========================================================================
# 8. HTTP client, shared by the worker and the CLI
# ===========================================================================


class ServerUnreachable(Exception):
    """The server could not be reached or the connection broke."""


class TlsError(Exception):
    """The server's certificate could not be verified, or TLS failed.

    Unlike ServerUnreachable this does not go away by retrying.
    """


class ApiError(Exception):
    """An error response from the server."""

    def __init__(self, status, message, retry_after=None):
        Exception.__init__(self, message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


class ApiClient:
    """A small client for the JSON API; one instance per thread."""

    def __init__(self, url, token, timeout=HTTP_TIMEOUT_SECONDS,
                 cacert=None, insecure=False):
        parsed = urllib.parse.urlsplit(url)
        try:
            port = parsed.port
        except ValueError:
            port = -1
        if parsed.scheme not in ("http", "https") or not parsed.hostname \
                or "://" not in url or port == -1:
            raise UserError("invalid server URL %r: expected "
                            "http://HOST:PORT/" % url)
        self.url = url
        self.scheme = parsed.scheme
        self.host = parsed.hostname
        self.port = port or (443 if parsed.scheme == "https"
                             else DEFAULT_PORT)
        self.prefix = parsed.path.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.connection = None
        self.last_used = 0.0
        self.tls_context = None
        if self.scheme == "https":
            try:
                self.tls_context = ssl.create_default_context(cafile=cacert)
            except (OSError, ssl.SSLError) as error:
                raise UserError("cannot read CA certificate %s: %s"
                                % (cacert, error))
            if insecure:
                self.tls_context.check_hostname = False
                self.tls_context.verify_mode = ssl.CERT_NONE

    def connect(self):
        if self.connection is None:
            if self.scheme == "https":
                self.connection = http.client.HTTPSConnection(
                    self.host, self.port, timeout=self.timeout,
                    context=self.tls_context)
            else:
                self.connection = http.client.HTTPConnection(
                    self.host, self.port, timeout=self.timeout)
        return self.connection

    def close(self):
        if self.connection is not None:
            self.connection.close()
            self.connection = None

    def request(self, method, path, body=None, content_type=None,
                target=None):
        """Send a request; return the response body (or write it to
        ``target``). ``body`` is bytes or an open file with a known size.
        """
        headers = {"Authorization": "Bearer %s" % self.token}
        if content_type:
            headers["Content-Type"] = content_type
        if body is not None:
            if isinstance(body, bytes):
                headers["Content-Length"] = str(len(body))
            else:
                headers["Content-Length"] = str(
                    os.fstat(body.fileno()).st_size)
        elif method in ("POST", "PUT"):
            headers["Content-Length"] = "0"
        if self.connection is not None and time.monotonic() - \
                self.last_used > CLIENT_IDLE_SECONDS:
            # The server closes idle connections after
            # HEADER_TIMEOUT_SECONDS. A request sent just then would fail
            # without telling whether the server got it, so start anew.
            self.close()
        try:
            connection = self.connect()
            connection.request(method, self.prefix + path, body, headers)
            response = connection.getresponse()
            if target is not None and response.status == 200:
                with open(target, "wb") as out:
                    shutil.copyfileobj(response, out, COPY_CHUNK_BYTES)
                data = b""
            else:
                data = response.read()
            self.last_used = time.monotonic()
            if response.getheader("Connection", "").lower() == "close":
                self.close()
        except ssl.SSLError as error:
            self.close()
            if isinstance(error, (ssl.SSLZeroReturnError, ssl.SSLEOFError)):
                raise ServerUnreachable("cannot reach %s: %s"
                                        % (self.url, error))
            raise TlsError("TLS with %s failed: %s; pass --cacert FILE with "
                           "the server's certificate (or --insecure to "
                           "skip the check)" % (self.url, error))
        except (OSError, http.client.HTTPException) as error:
            self.close()
            raise ServerUnreachable(
                "cannot reach %s: %s (is 'httpov.py serve' running there, "
                "and are host and port right?)"
                % (self.url, error or type(error).__name__))
        if response.status >= 400:
            try:
                message = json.loads(data.decode())["error"]
            except (ValueError, KeyError, TypeError, UnicodeDecodeError):
                message = data.decode("utf-8", "replace")[:300] or \
                    response.reason
            retry_after = response.getheader("Retry-After")
            raise ApiError(response.status, message,
                           float(retry_after) if retry_after and
                           retry_after.isdigit() else None)
        return data

    def call(self, method, path, value=None):
        """Send JSON (or nothing) and decode the JSON response."""
        body = None if value is None else json.dumps(value).encode()
        data = self.request(method, path, body,
                            "application/json" if body else None)
        return json.loads(data.decode()) if data.strip() else {}

    def upload(self, path, file_path, content_type="application/zip"):
        with open(file_path, "rb") as body:
            data = self.request("POST", path, body, content_type)
        return json.loads(data.decode())

    def download(self, path, target):
        self.request("GET", path, target=target)


def backoff_delays(first=RETRY_MIN_SECONDS, cap=RETRY_MAX_SECONDS):
    """Yield exponentially growing waits with +-25 % jitter."""
    delay = first
    while True:
        yield delay * random.uniform(0.75, 1.25)
        delay = min(delay * 2, cap)


# ===========================================================================
# 9. Worker: running POV-Ray
# ===========================================================================

PROGRESS_PATTERN = re.compile(rb"Rendered (\d{1,18}) of (\d{1,18}) pixels")
FRAME_PATTERN = re.compile(rb"Rendering frame (\d{1,18}) of (\d{1,18})")
ERROR_PATTERN = re.compile(r"Parse Error|Fatal error|Error:|error:|"
                           r"Cannot |Render failed|Aborting render|"
                           r"Render error")
OUTPUT_BASE = "frame"
ERROR_FILE = "fatal.txt"
POVRAY_LINE_WIDTH = 80             # where POV-Ray breaks console lines
TERMINATE_WAIT_SECONDS = 5.0       # after SIGTERM, before SIGKILL
WINDOWS_POVRAY_NAMES = ("pvengine", "pvengine64")
WINDOWS_LOG_FILE = "povray-output.txt"  # pvengine's messages
CREATE_NO_WINDOW = 0x08000000      # Windows: start without a console
SYSTEM_POVRAY_INIS = (
    "/etc/povray/3.7/povray.ini",
    "/usr/local/etc/povray/3.7/povray.ini",
    "/etc/povray/povray.ini",
)


def library_paths():
    """Read Library_Path lines of the system POV-Ray INI, if any.

    The worker runs POV-Ray with its own POVINI, which would otherwise
    lose the standard include folder that the system INI names.
    """
    paths = []
    for candidate in SYSTEM_POVRAY_INIS:
        try:
            with open(candidate, errors="replace") as source:
                text = source.read()
        except OSError:
            continue
        for line in text.splitlines():
            key, _, value = line.split(";", 1)[0].partition("=")
            if key.strip().lower() == "library_path" and value.strip():
                paths.append(value.strip().strip('"'))
        break
    return paths


def is_windows_povray(povray):
    """Tell whether ``povray`` is POV-Ray for Windows (pvengine), which
    takes the path in either Windows or POSIX form."""
    name = ntpath.basename(povray).lower()
    if name.endswith(".exe"):
        name = name[:-len(".exe")]
    return name in WINDOWS_POVRAY_NAMES


def povray_command(povray, task, threads, output_base, error_file):
    """Build POV-Ray's command line for a task.

    Order matters: the job's INI, then the submit options, then the
    farm's own options, because POV-Ray lets later options win.

    POV-Ray for Windows (pvengine) is a window program: /NR starts it
    without last session's files, /RENDER names what to render and
    /EXIT closes it afterwards. It prints nothing to a console, so its
    messages go to the stream file WINDOWS_LOG_FILE beside the image.
    """
    settings = task["settings"]
    check_task_ranges(task)
    windows = is_windows_povray(povray)
    command = [povray]
    if windows:
        command.extend(["/NR", "/EXIT", "/RENDER",
                        task["ini"] or settings["input_file"]])
    elif task["ini"]:
        command.append(task["ini"])
    command.extend(task["povray_options"])
    command.extend([
        # The worker's POVINI sets no size, and POV-Ray's built-in
        # default (160x120) differs from the system INI's 800x600.
        "+W%d" % settings["width"], "+H%d" % settings["height"],
        "+I" + settings["input_file"],
        "+O" + output_base,
        "+FN%d" % settings["depth"],
        "-D", "-P", "+WT%d" % threads,
        "+GF" + error_file,
    ])
    if windows:
        command.append("+GA" + WINDOWS_LOG_FILE)
    if settings["animated"]:
        command.extend(["+SF%d" % task["frame_first"],
                        "+EF%d" % task["frame_last"]])
    if task["sliced"]:
        # Row 1 and the last row are left out: POV-Ray reads 1 as the
        # fraction 1.0, and the default range covers them anyway.
        if task["row_first"] > 1:
            command.append("+SR%d" % task["row_first"])
        if task["row_last"] < settings["height"]:
            command.append("+ER%d" % task["row_last"])
    return command


def check_task_ranges(task):
    """Raise TaskFailed unless the task's frames and rows make sense.

    POV-Ray renders a reversed row range as an all-black image and exits
    0, so a bad range must be caught before it runs.
    """
    settings = task["settings"]
    first, last = task["row_first"], task["row_last"]
    if not 1 <= first <= last <= settings["height"]:
        raise TaskFailed("invalid rows %d-%d for an image of %d rows"
                         % (first, last, settings["height"]))
    if last == 1 and settings["height"] > 1:
        raise TaskFailed("invalid rows %d-%d: POV-Ray reads end row 1 as "
                         "all rows" % (first, last))
    if task["frame_first"] > task["frame_last"]:
        raise TaskFailed("invalid frames %d-%d" % (task["frame_first"],
                                                   task["frame_last"]))
    if settings["animated"] and not (
            settings["initial_frame"] <= task["frame_first"] and
            task["frame_last"] <= settings["final_frame"]):
        raise TaskFailed("frames %d-%d are outside the animation's %d-%d"
                         % (task["frame_first"], task["frame_last"],
                            settings["initial_frame"],
                            settings["final_frame"]))


def povray_error(log_text, error_file_text=""):
    """Pick POV-Ray's own error message out of its output."""
    raw_lines = [line.rstrip() for line in log_text.splitlines()
                 if line.strip()]
    lines = [line.strip() for line in raw_lines]
    for index, line in enumerate(lines):
        if ERROR_PATTERN.search(line) and "Possible" not in line and \
                line != "Render failed":
            # POV-Ray 3.7 breaks messages at 80 columns, even inside a
            # word, and sometimes continues them on indented lines.
            previous = raw_lines[index]
            for following in raw_lines[index + 1:index + 4]:
                if len(previous) >= POVRAY_LINE_WIDTH - 1:
                    line += following.strip()
                elif following[:1].isspace():
                    line += " " + following.strip()
                else:
                    break
                previous = following
            return line
    report = [line.strip() for line in error_file_text.splitlines()
              if line.strip()]
    if report:
        return " ".join(report[-2:])
    if "Render failed" in lines:
        # Option errors print one plain line just before "Render failed".
        index = lines.index("Render failed")
        return " ".join(lines[max(index - 1, 0):index + 1])
    return " | ".join(lines[-3:]) or "POV-Ray printed nothing"


def describe_exit(returncode, sandboxed=False):
    if sandboxed and returncode > 128:
        # bubblewrap exits with 128 + N when POV-Ray died of signal N.
        returncode = 128 - returncode
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except (ValueError, AttributeError):
            name = "signal %d" % -returncode
        return ("POV-Ray was killed by %s (out of memory, or stopped from "
                "outside)" % name)
    if returncode == 2:
        return "POV-Ray was cancelled (exit code 2)"
    return "POV-Ray failed with exit code %d" % returncode


# Runs between the worker and POV-Ray on POSIX systems: it sets the
# resource limits, drops to the render user and replaces itself with
# POV-Ray (or bubblewrap), so no Python code runs in a forked child of a
# threaded worker.
LAUNCHER = """
import json, os, resource, sys
spec = json.loads(sys.argv[1])
for name, value in spec["limits"]:
    kind = getattr(resource, name)
    soft, hard = resource.getrlimit(kind)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(kind, (value, value))
if spec["gid"] is not None:
    os.setgroups([])
    os.setgid(spec["gid"])
if spec["uid"] is not None:
    os.setuid(spec["uid"])
os.execvp(sys.argv[2], sys.argv[2:])
"""


def sandbox_command(bwrap, povray, povini, scene_dir, output_dir,
                    home_dir, shm_dir):
    """Return the bubblewrap prefix that confines POV-Ray.

    Inside, POV-Ray can read /usr and the POV-Ray installation, can read
    and write its task's scene, output and home folders, and has no
    network. The root of the sandbox is read-only, so ``../escape.txt``
    cannot be written. /dev/shm is ``shm_dir``, also in the task folder,
    so that files written there count toward --max-task-disk.
    """
    command = [bwrap, "--unshare-all", "--die-with-parent", "--new-session",
               "--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = "/" + name
        if os.path.islink(path):
            command += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            command += ["--ro-bind", path, path]
    for path in ("/etc/povray", "/etc/ld.so.cache", "/etc/alternatives"):
        if os.path.exists(path):
            command += ["--ro-bind", path, path]
    # A POV-Ray outside /usr brings only its own folder, not its parent,
    # which might be a home folder.
    install = os.path.dirname(os.path.realpath(povray))
    if not install.startswith("/usr/"):
        command += ["--ro-bind", install, install]
    command += ["--proc", "/proc", "--dev", "/dev",
                "--bind", shm_dir, "/dev/shm",
                "--ro-bind", povini, povini]
    for folder in (scene_dir, output_dir, home_dir):
        command += ["--bind", folder, folder]
    command += ["--chdir", scene_dir, "--remount-ro", "/", "--"]
    return command


def render_user(name):
    """Return (uid, gid) of the user POV-Ray runs as, or (None, None).

    Raises CommandError for root without a user, which would let every
    scene act as root, and for an unknown user.
    """
    if not hasattr(os, "geteuid"):
        if name:
            worker_log.warning("--user %s ignored: this system cannot "
                               "switch users; run the worker itself as "
                               "that user", name)
        return None, None
    if not name:
        if os.geteuid() == 0:
            raise CommandError("refusing to render as root: a scene is a "
                               "program; pass --user NAME (or set "
                               "HTTPOV_USER) to render as that unprivileged "
                               "user")
        return None, None
    import pwd
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise CommandError("user %r not found; pass an existing "
                           "unprivileged user to --user" % name)
    if entry.pw_uid == 0:
        raise CommandError("--user %s is root; pass an unprivileged user"
                           % name)
    if os.geteuid() != 0 and os.geteuid() != entry.pw_uid:
        raise CommandError("--user %s needs the worker to run as root (it "
                           "runs as uid %d)" % (name, os.geteuid()))
    if os.geteuid() != 0:
        return None, None
    return entry.pw_uid, entry.pw_gid


def check_own_folder(path):
    """Raise CommandError unless ``path`` is a real folder of this user
    that no one else may write to.

    Otherwise another local user could swap cached scenes or plant
    links there, and a root worker would follow them.
    """
    if not hasattr(os, "geteuid"):
        return
    info = os.lstat(path)
    # Root trusts no group; a user's own group is often only that user.
    others = 0o022 if os.geteuid() == 0 else 0o002
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or \
            info.st_mode & others:
        raise CommandError(
            "work folder %s is not safe: it must be a folder (not a link) "
            "owned by this user (uid %d, not %d) that others cannot write "
            "(mode %o); choose another --workdir"
            % (path, os.geteuid(), info.st_uid, stat.S_IMODE(info.st_mode)))


def chown_tree(path, uid, gid):
    os.chown(path, uid, gid)
    for folder, subfolders, files in os.walk(path):
        for name in subfolders + files:
            os.chown(os.path.join(folder, name), uid, gid,
                     follow_symlinks=False)


def check_reachable(path, uid, gid):
    """Raise CommandError unless ``uid`` can enter every folder above path.

    A rough check of the permission bits, which catches the usual
    mistake: a work folder inside root's home or a private temp folder.
    """
    folder = os.path.abspath(path)
    while True:
        info = os.stat(folder)
        if info.st_uid == uid:
            allowed = info.st_mode & stat.S_IXUSR
        elif info.st_gid == gid:
            allowed = info.st_mode & stat.S_IXGRP
        else:
            allowed = info.st_mode & stat.S_IXOTH
        if not allowed:
            raise CommandError("the render user (uid %d) cannot enter %s; "
                               "choose a --workdir it can reach, or make "
                               "that folder searchable (chmod o+x)"
                               % (uid, folder))
        parent = os.path.dirname(folder)
        if parent == folder:
            return
        folder = parent


class TaskFailed(Exception):
    """A failed render attempt, with the reason as its message."""

    def __init__(self, message, log_text=""):
        Exception.__init__(self, message)
        self.log_text = log_text


class TaskAbandoned(Exception):
    """The task was cancelled or handed to another attempt."""


class Worker:
    """Takes tasks from a server, renders them and delivers results."""

    def __init__(self, url, token, name=None, group="", povray="povray",
                 threads=None, workdir=None, once=False, console=True,
                 exit_when_idle=0,
                 max_task_seconds=DEFAULT_MAX_TASK_SECONDS,
                 stall_seconds=DEFAULT_STALL_SECONDS,
                 cacert=None, insecure=False, user=None, sandbox="auto",
                 memory_mib=None, max_disk_mib=DEFAULT_MAX_TASK_DISK_MIB):
        self.url = url
        self.token = token
        self.name = name or socket.gethostname()
        self.group = group or ""
        self.povray = povray
        self.threads = threads or os.cpu_count() or 1
        self.workdir = os.path.abspath(workdir or default_workdir())
        self.once = once
        self.exit_when_idle = exit_when_idle    # seconds; 0: never
        self.max_task_seconds = max_task_seconds
        self.stall_seconds = stall_seconds
        self.max_disk_mib = max_disk_mib        # 0: no limit
        self.console = console and sys.stderr.isatty()
        self.cacert = cacert
        self.insecure = insecure
        self.client = self.new_client()
        self.worker_id = None
        self.max_result_bytes = None
        self.stop_after_task = threading.Event()
        self.stop_now = threading.Event()
        self.process = None
        self.process_lock = threading.Lock()
        os.makedirs(self.workdir, exist_ok=True)
        check_own_folder(self.workdir)
        for folder in ("archives", "jobs", "tasks", "outbox"):
            path = os.path.join(self.workdir, folder)
            os.makedirs(path, exist_ok=True)
            check_own_folder(path)
        for folder in ("archives", "jobs", "outbox"):
            # Other jobs' scenes and results stay out of a scene's reach.
            os.chmod(os.path.join(self.workdir, folder), 0o700)
        self.uid, self.gid = render_user(user)
        if self.uid is not None:
            os.chmod(os.path.join(self.workdir, "tasks"), 0o755)
            check_reachable(os.path.join(self.workdir, "tasks"), self.uid,
                            self.gid)
        # Each POV-Ray thread reserves address space for its stack and its
        # malloc arena, so the limit grows with the thread count.
        self.memory_mib = memory_mib or (DEFAULT_MEMORY_MIB +
                                         MEMORY_MIB_PER_THREAD *
                                         self.threads)
        self.bwrap = None
        if sandbox not in ("auto", "bwrap", "none"):
            raise CommandError("invalid --sandbox %r: expected auto, bwrap "
                               "or none" % sandbox)
        if sandbox != "none":
            self.bwrap = shutil.which("bwrap")
            if self.bwrap is None and sandbox == "bwrap":
                raise CommandError("--sandbox bwrap needs bubblewrap; "
                                   "install it (apt-get install "
                                   "bubblewrap) or pass --sandbox auto")
        self.povini = os.path.join(self.workdir, "povray.ini")
        lines = ['Library_Path="%s"' % path for path in library_paths()]
        write_file_atomically(self.povini,
                              ("\n".join(lines) + "\n").encode())
        os.chmod(self.povini, 0o644)
        self.describe_confinement(user)

    def describe_confinement(self, user):
        """Say once, at start, what a scene can reach on this machine."""
        who = "user %s" % user if user else "this worker's user"
        limits = ("resource limits (memory %d MiB)" % self.memory_mib
                  if os.name == "posix" else "no resource limits (the "
                  "resource module is POSIX only)")
        if self.bwrap:
            worker_log.info("scenes run as %s in a bubblewrap sandbox "
                            "(task folder only, no network), with %s",
                            who, limits)
        else:
            worker_log.warning(
                "no sandbox: a scene runs as %s and can read and write "
                "every file that user can and use the network; install "
                "bubblewrap to confine it. Scenes run with %s.",
                who, limits)

    # -- talking to the server, with retries --------------------------------

    def new_client(self):
        return ApiClient(self.url, self.token, cacert=self.cacert,
                         insecure=self.insecure)

    def call(self, method, path, value=None, client=None):
        """Call the API, retrying while the server is unreachable or busy.

        Raises ApiError for error responses other than 503, and
        TaskAbandoned when the worker must stop while waiting.
        """
        client = client or self.client
        delays = backoff_delays()
        while True:
            try:
                return client.call(method, path, value)
            except ServerUnreachable as error:
                delay = next(delays)
                worker_log.warning("%s; retrying in %.0f s", error, delay)
            except ApiError as error:
                if error.status != 503:
                    raise
                delay = error.retry_after or next(delays)
                worker_log.warning("server busy; retrying in %.0f s", delay)
            if self.stop_now.wait(delay):
                raise TaskAbandoned("stopped while waiting for the server")

    def register(self):
        answer = self.call("POST", "/api/workers", {
            "name": self.name, "group": self.group,
            "host": socket.gethostname()})
        self.worker_id = answer["worker"]
        self.max_result_bytes = answer.get("max_result_bytes")
        worker_log.info("registered with %s as worker %d (%s)",
                        self.url, self.worker_id, self.name)

    def run(self):
        """Work until stopped; return the process exit code."""
        try:
            self.register()
            self.deliver_outbox()
            idle = IDLE_POLL_SECONDS
            idle_since = time.monotonic()
            while not self.stop_after_task.is_set():
                try:
                    answer = self.call("POST", "/api/claim",
                                       {"worker": self.worker_id})
                except ApiError as error:
                    if error.status == 404:
                        worker_log.warning("server forgot this worker "
                                           "(%s); registering again",
                                           error.message)
                        self.register()
                        continue
                    raise
                task = answer.get("task")
                if task is None:
                    if self.once:
                        worker_log.info("no task available; exiting")
                        return 0
                    if self.exit_when_idle and time.monotonic() - \
                            idle_since >= self.exit_when_idle:
                        worker_log.info("no task for %.0f s; exiting",
                                        self.exit_when_idle)
                        return 0
                    wait = min(idle, MAX_IDLE_POLL_SECONDS)
                    idle = min(idle * 1.5, MAX_IDLE_POLL_SECONDS)
                    self.stop_after_task.wait(
                        wait * random.uniform(0.8, 1.2))
                    continue
                idle = float(answer.get("retry_after") or
                             IDLE_POLL_SECONDS)
                self.handle_task(task)
                self.deliver_outbox()
                idle_since = time.monotonic()
                if self.once:
                    return 0
        except TaskAbandoned:
            pass
        except ApiError as error:
            worker_log.error("server rejected the worker: %s (HTTP %d)",
                             error.message, error.status)
            return 1
        except TlsError as error:
            worker_log.error("%s", error)
            return 1
        worker_log.info("worker %s stopped", self.worker_id)
        return 0

    def stop(self, now=False):
        self.stop_after_task.set()
        if now:
            self.stop_now.set()
            self.terminate_povray()

    # -- one task -----------------------------------------------------------

    def handle_task(self, task):
        label = task_label(task)
        worker_log.info("%s: started (attempt %s)", label,
                        task["attempt"][:8])
        task_dir = os.path.join(self.workdir, "tasks", "%d-%s" % (
            task["id"], task["attempt"][:12]))
        heartbeat = Heartbeat(self, task)
        try:
            job_dir = self.prepare_job(task)
            heartbeat.start()
            result = self.render(task, job_dir, task_dir, heartbeat)
            self.queue_result(task, result)
            worker_log.info("%s: rendered", label)
        except TaskAbandoned as reason:
            worker_log.warning("%s: abandoned (%s)", label, reason)
            if heartbeat.cancelled or (self.stop_now.is_set() and
                                       not heartbeat.rejected):
                self.release(task)
        except TaskFailed as failure:
            worker_log.error("%s: failed: %s", label, failure)
            self.report_failure(task, str(failure), failure.log_text)
        finally:
            heartbeat.stop()
            shutil.rmtree(task_dir, ignore_errors=True)

    def release(self, task):
        try:
            self.client.call("POST", "/api/tasks/%d/release" % task["id"],
                             {"attempt": task["attempt"]})
        except (ServerUnreachable, ApiError) as error:
            worker_log.warning("task %d: release failed (%s); its lease "
                               "will expire", task["id"], error)

    def report_failure(self, task, message, log_text):
        try:
            self.call("POST", "/api/tasks/%d/fail" % task["id"], {
                "attempt": task["attempt"], "error": message,
                "log": log_text[-MAX_LOG_BYTES:]})
        except ApiError as error:
            worker_log.warning("task %d: failure report rejected: %s",
                               task["id"], error.message)
        except TaskAbandoned:
            pass

    def prepare_job(self, task):
        """Download and unpack a job archive once; return the job folder."""
        archive_sha = task["archive"]
        if not ARCHIVE_NAME.match(archive_sha):
            raise TaskFailed("server sent an invalid archive id %r"
                             % archive_sha)
        archive = os.path.join(self.workdir, "archives",
                               archive_sha + ".zip")
        if not os.path.exists(archive):
            temp_path = "%s.part-%d-%d" % (archive, os.getpid(),
                                           threading.get_ident())
            delays = backoff_delays()
            while True:
                try:
                    self.client.download("/api/archives/%s.zip"
                                         % archive_sha, temp_path)
                    break
                except ServerUnreachable as error:
                    delay = next(delays)
                    worker_log.warning("job %d: archive download failed "
                                       "(%s); retrying in %.0f s",
                                       task["job_id"], error, delay)
                    if self.stop_now.wait(delay):
                        remove_quietly(temp_path)
                        raise TaskAbandoned("stopped")
                except ApiError as error:
                    remove_quietly(temp_path)
                    raise TaskFailed("archive download failed: %s"
                                     % error.message)
            if sha256_of_file(temp_path) != archive_sha:
                remove_quietly(temp_path)
                raise TaskFailed("downloaded archive does not match its "
                                 "SHA-256 %s" % archive_sha)
            os.replace(temp_path, archive)
            worker_log.info("job %d: archive %s downloaded",
                            task["job_id"], archive_sha[:12])
        unpacked = os.path.join(self.workdir, "jobs", archive_sha)
        if not os.path.isdir(unpacked):
            try:
                inspect_archive(archive)
            except UserError as error:
                raise TaskFailed("job archive rejected: %s" % error)
            temp_dir = tempfile.mkdtemp(dir=os.path.join(self.workdir,
                                                         "jobs"))
            try:
                unpack_archive(archive, temp_dir)
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError,
                    NotImplementedError) as error:
                shutil.rmtree(temp_dir, ignore_errors=True)
                raise TaskFailed("job archive cannot be unpacked: %s"
                                 % error)
            try:
                os.rename(temp_dir, unpacked)
            except OSError:
                shutil.rmtree(temp_dir, ignore_errors=True)
        job_dir = os.path.join(unpacked, *task["root"].strip("/").split("/")
                               ) if task["root"] else unpacked
        if not os.path.isdir(job_dir):
            raise TaskFailed("job folder %r is missing from the archive"
                             % task["root"])
        return job_dir

    def render(self, task, job_dir, task_dir, heartbeat):
        """Run POV-Ray for a task; return the path of the result zip."""
        scene_dir = os.path.join(task_dir, "scene")
        output_dir = os.path.join(task_dir, "output")
        home_dir = os.path.join(task_dir, "home")
        shm_dir = os.path.join(task_dir, "shm")
        shutil.rmtree(task_dir, ignore_errors=True)
        shutil.copytree(job_dir, scene_dir)
        os.makedirs(output_dir)
        os.makedirs(home_dir)
        # POV-Ray takes a bare stream file name and writes the file
        # beside the image; a path elsewhere fails the render.
        output_base = os.path.join(output_dir, OUTPUT_BASE)
        windows = is_windows_povray(self.povray)
        if windows:
            # Relative to the scene folder, the output path has neither
            # the drive letter nor the spaces of the work folder.
            output_base = windows_output_base(output_base, scene_dir)
        command = povray_command(self.povray, task, self.threads,
                                 output_base, ERROR_FILE)
        if self.bwrap:
            os.makedirs(shm_dir)
            command = sandbox_command(
                self.bwrap, shutil.which(self.povray) or self.povray,
                self.povini, scene_dir, output_dir, home_dir,
                shm_dir) + command
        if os.name == "posix":
            command = self.launcher_command() + command
        if self.uid is not None:
            os.chmod(task_dir, 0o755)
            chown_tree(scene_dir, self.uid, self.gid)
            chown_tree(output_dir, self.uid, self.gid)
            chown_tree(home_dir, self.uid, self.gid)
            if self.bwrap:
                chown_tree(shm_dir, self.uid, self.gid)
        environment = dict(os.environ, POVINI=self.povini, HOME=home_dir)
        environment.pop("HTTPOV_TOKEN", None)
        worker_log.debug("%s: running %s", task_label(task),
                         " ".join(command))

        process = self.start_povray(command, scene_dir, environment)
        watchdog = Watchdog(self, task_label(task), self.max_task_seconds,
                            self.stall_seconds, task_dir, self.max_disk_mib)
        log_file = os.path.join(output_dir, WINDOWS_LOG_FILE)
        if windows:
            watchdog.output_file = log_file
        try:
            log_text = self.follow_output(process, task, heartbeat,
                                          watchdog)
            returncode = process.wait()
            if windows:
                log_text = read_tail(log_file, MAX_LOG_BYTES)
        finally:
            watchdog.stop()
            if process.poll() is None:
                self.terminate_povray()
            process.stderr.close()
            with self.process_lock:
                self.process = None
        self.show_progress(task, None)

        if heartbeat.rejected or self.stop_now.is_set():
            raise TaskAbandoned(heartbeat.rejected or "stopped by the user")
        if not watchdog.reason:
            # Files written in the last second before POV-Ray ended.
            watchdog.reason = watchdog.check_disk()
        if watchdog.reason:
            raise TaskFailed(watchdog.reason, log_text)
        error_text = ""
        error_file = os.path.join(output_dir, ERROR_FILE)
        if os.path.exists(error_file):
            with open(error_file, errors="replace") as source:
                error_text = source.read(4096)
        if returncode != 0:
            raise TaskFailed("%s: %s" % (describe_exit(returncode,
                                                       bool(self.bwrap)),
                                         povray_error(log_text, error_text)),
                             log_text)
        if "Parse Error" in log_text and \
                "Possible Parse Error" not in log_text:
            raise TaskFailed("POV-Ray reported a parse error: %s"
                             % povray_error(log_text, error_text), log_text)
        return self.pack_result(task, output_dir, task_dir, log_text)

    def launcher_command(self):
        """Return the command prefix that applies limits and the user."""
        cpu_seconds = int((self.max_task_seconds or
                           DEFAULT_MAX_TASK_SECONDS) * self.threads) + 60
        spec = {
            "limits": [
                ["RLIMIT_CPU", cpu_seconds],
                ["RLIMIT_AS", self.memory_mib << 20],
                ["RLIMIT_FSIZE", MAX_RENDER_FILE_BYTES],
                ["RLIMIT_NOFILE", MAX_RENDER_OPEN_FILES],
                ["RLIMIT_NPROC", MAX_RENDER_PROCESSES],
            ],
            "uid": self.uid,
            "gid": self.gid,
        }
        return [sys.executable, "-c", LAUNCHER, json.dumps(spec)]

    def start_povray(self, command, scene_dir, environment):
        """Start POV-Ray in its own process group, so that a Ctrl-C in
        the worker's terminal does not reach it."""
        options = {}
        if os.name == "posix":
            options["start_new_session"] = True
        elif hasattr(subprocess, "CREATE_NEW_PROCESS_GROUP"):
            options["creationflags"] = \
                subprocess.CREATE_NEW_PROCESS_GROUP | CREATE_NO_WINDOW
        try:
            process = subprocess.Popen(
                command, cwd=scene_dir, env=environment,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, **options)
        except OSError as error:
            raise TaskFailed("cannot start POV-Ray %r: %s; install "
                             "POV-Ray 3.7 or pass --povray PATH"
                             % (self.povray, error))
        with self.process_lock:
            self.process = process
        return process

    def follow_output(self, process, task, heartbeat, watchdog):
        """Read POV-Ray's stderr to its end, tracking progress.

        Returns the last MAX_LOG_BYTES of the output as text.
        """
        log_tail = collections.deque()
        log_size = 0
        frames = task["frame_last"] - task["frame_first"] + 1
        frame_index = 0
        recent = b""
        while True:
            chunk = os.read(process.stderr.fileno(), 65536)
            if not chunk:
                break
            watchdog.last_output = time.monotonic()
            log_tail.append(chunk)
            log_size += len(chunk)
            while log_size > MAX_LOG_BYTES and len(log_tail) > 1:
                log_size -= len(log_tail.popleft())

            # Progress lines end in a carriage return, so the last match
            # in the recent output is the current one.
            recent = (recent + chunk)[-4096:]
            for match in FRAME_PATTERN.finditer(recent):
                frame_index = max(int(match.group(1)) - 1, 0)
            matches = list(PROGRESS_PATTERN.finditer(recent))
            if matches:
                done, total = map(int, matches[-1].groups())
                progress = (frame_index + done / max(total, 1)) / frames
                heartbeat.progress = min(progress, 1.0)
                self.show_progress(task, heartbeat.progress)
        log_text = b"".join(log_tail).decode("utf-8", "replace")
        return log_text.replace("\r\n", "\n").replace("\r", "\n")

    def pack_result(self, task, output_dir, task_dir, log_text):
        """Check POV-Ray's images and zip them with the log."""
        settings = task["settings"]
        images = {}
        for name in os.listdir(output_dir):
            match = re.match(r"^%s(-?\d*)\.png$" % OUTPUT_BASE, name)
            if match:
                frame = int(match.group(1)) if match.group(1) else None
                images[frame] = os.path.join(output_dir, name)
        expected = list(range(task["frame_first"], task["frame_last"] + 1))
        if not settings["animated"]:
            if len(images) == 1:
                images = {expected[0]: list(images.values())[0]}
        missing = [frame for frame in expected if frame not in images]
        if missing:
            raise TaskFailed("POV-Ray exited without writing the image of "
                             "frame %s (output folder holds: %s)"
                             % (missing[0], ", ".join(sorted(
                                 os.listdir(output_dir))) or "nothing"),
                             log_text)
        result = os.path.join(task_dir, "result.zip")
        with zipfile.ZipFile(result, "w") as archive:
            for frame in expected:
                path = images[frame]
                try:
                    check_png(path, settings["width"], settings["height"])
                except ImageError as error:
                    raise TaskFailed("image of frame %d is invalid: %s"
                                     % (frame, error), log_text)
                if task["sliced"]:
                    cropped = os.path.join(task_dir, "slice.png")
                    crop_png(path, cropped, task["row_first"],
                             task["row_last"])
                    archive.write(cropped, "slice.png")
                else:
                    archive.write(path, "frames/%d.png" % frame)
            archive.writestr("log.txt", log_text[-MAX_LOG_BYTES:],
                             zipfile.ZIP_DEFLATED)
        size = os.path.getsize(result)
        if self.max_result_bytes and size > self.max_result_bytes:
            raise TaskFailed("result of %d bytes is larger than the "
                             "server's limit of %d bytes (serve "
                             "--max-result-mib)" % (size,
                                                    self.max_result_bytes),
                             log_text)
        return result

    def terminate_povray(self):
        """Stop POV-Ray and its children: SIGTERM, then SIGKILL."""
        with self.process_lock:
            process = self.process
        if process is None or process.poll() is not None:
            return
        try:
            if os.name == "posix":
                os.killpg(process.pid, signal.SIGTERM)
            else:
                process.terminate()
            process.wait(TERMINATE_WAIT_SECONDS)
        except subprocess.TimeoutExpired:
            if os.name == "posix":
                os.killpg(process.pid, signal.SIGKILL)
            else:
                process.kill()
        except OSError:
            pass

    def show_progress(self, task, progress):
        if not self.console:
            return
        if progress is None:
            sys.stderr.write("\r" + " " * 70 + "\r")
        else:
            sys.stderr.write("\r%-60s %3.0f%%" % (task_label(task)[:60],
                                                  100 * progress))
        sys.stderr.flush()

    # -- results ------------------------------------------------------------

    def queue_result(self, task, result):
        """Move a result into the outbox, where it waits for delivery."""
        base = os.path.join(self.workdir, "outbox", "%d-%s" % (
            task["id"], task["attempt"]))
        os.replace(result, base + ".zip")
        write_file_atomically(base + ".json", json.dumps({
            "task": task["id"], "attempt": task["attempt"],
            "job": task["job_id"]}).encode())

    def deliver_outbox(self):
        """Deliver every waiting result, retrying while the server is down.

        A result stays on disk until the server accepted or finally
        rejected it, so results survive a server outage and a restart
        of the worker.
        """
        with OUTBOX_LOCK:
            self.deliver_outbox_locked()

    def deliver_outbox_locked(self):
        outbox = os.path.join(self.workdir, "outbox")
        for name in sorted(os.listdir(outbox)):
            if not name.endswith(".json"):
                continue
            meta_path = os.path.join(outbox, name)
            result = meta_path[:-len(".json")] + ".zip"
            try:
                with open(meta_path) as source:
                    meta = json.load(source)
            except (OSError, ValueError):
                remove_quietly(meta_path)
                continue
            if not os.path.exists(result):
                remove_quietly(meta_path)
                continue
            self.deliver(meta, result)
            remove_quietly(result)
            remove_quietly(meta_path)

    def deliver(self, meta, result):
        path = "/api/tasks/%d/result?attempt=%s" % (meta["task"],
                                                    meta["attempt"])
        delays = backoff_delays()
        while True:
            try:
                self.client.upload(path, result)
                worker_log.info("job %s task %d: result delivered",
                                meta.get("job"), meta["task"])
                return
            except ServerUnreachable as error:
                delay = next(delays)
                worker_log.warning("task %d: delivery failed (%s); result "
                                   "kept, retrying in %.0f s",
                                   meta["task"], error, delay)
            except ApiError as error:
                if error.status == 503:
                    delay = error.retry_after or next(delays)
                else:
                    worker_log.warning("task %d: result rejected (HTTP %d):"
                                       " %s", meta["task"], error.status,
                                       error.message)
                    if error.status == 413:
                        # The server never read the result, so it has not
                        # counted the failure yet.
                        self.report_failure(
                            {"id": meta["task"], "attempt": meta["attempt"]},
                            "result too large: %s" % error.message, "")
                    return
            if self.stop_now.wait(delay):
                raise TaskAbandoned("stopped before delivering")


# Workers of one ``work --tasks N`` process share their outbox.
OUTBOX_LOCK = threading.Lock()


class Watchdog:
    """Stops POV-Ray when a task runs too long, prints nothing for long,
    or fills the disk.

    A limit of 0 turns that check off. The disk check measures the task
    folder, which contains everything a sandboxed POV-Ray can write.
    """

    def __init__(self, worker, label, max_seconds, stall_seconds,
                 task_dir=None, max_disk_mib=0):
        self.worker = worker
        self.label = label          # the task, for the log
        self.max_seconds = max_seconds
        self.stall_seconds = stall_seconds
        self.task_dir = task_dir
        self.max_disk_mib = max_disk_mib
        self.started = self.last_output = time.monotonic()
        self.output_file = None     # output that goes to a file instead
        self.output_size = 0
        self.reason = None
        self.stopped = threading.Event()
        if max_seconds or stall_seconds or (task_dir and max_disk_mib):
            threading.Thread(target=self.run, daemon=True,
                             name="watchdog").start()

    def run(self):
        while not self.stopped.wait(1.0):
            self.reason = self.broken_limit(time.monotonic())
            if self.reason:
                worker_log.warning("%s: stopping POV-Ray: %s", self.label,
                                   self.reason)
                self.worker.terminate_povray()
                return

    def broken_limit(self, now):
        """Return the limit the task has broken, in words, or None."""
        if self.output_file:
            try:
                size = os.path.getsize(self.output_file)
            except OSError:
                size = 0
            if size != self.output_size:
                self.output_size = size
                self.last_output = now
        if self.max_seconds and now - self.started > self.max_seconds:
            return ("task ran longer than the limit of %.0f s "
                    "(work --max-task-time)" % self.max_seconds)
        if self.stall_seconds and now - self.last_output > self.stall_seconds:
            return ("POV-Ray printed nothing for %.0f s "
                    "(work --stall-timeout)" % self.stall_seconds)
        return self.check_disk()

    def check_disk(self):
        """Return why the task's files must stop growing, or None."""
        if not (self.task_dir and self.max_disk_mib):
            return None
        used = folder_bytes(self.task_dir)
        try:
            free = shutil.disk_usage(self.task_dir).free
        except OSError:
            free = None
        return disk_problem(used, free, self.max_disk_mib)

    def stop(self):
        self.stopped.set()


def folder_bytes(path):
    """Return the disk space that the files and folders under ``path``
    take, without following links. Where the system reports blocks, a
    file with data takes at least one, so many tiny files count. Files that
    vanish while counting are skipped."""
    total = 0
    for folder, _, files in os.walk(path):
        for name in [""] + files:
            try:
                status = os.lstat(os.path.join(folder, name))
            except OSError:
                continue
            blocks = getattr(status, "st_blocks", None)
            total += status.st_size if blocks is None else blocks * 512
    return total


def disk_problem(used, free, max_mib):
    """Return why a task that uses ``used`` bytes, on a disk with
    ``free`` bytes left (None: unknown), must be stopped, or None."""
    if used > max_mib << 20:
        return ("the task's files grew past the limit of %d MiB "
                "(--max-task-disk)" % max_mib)
    # A task that is only a small part of a full disk is not to blame.
    if free is not None and free < MIN_FREE_DISK_MIB << 20 and \
            used > MIN_FREE_DISK_MIB << 20:
        return ("the disk of the work folder is almost full (%d MiB free) "
                "and the task's files take %d MiB"
                % (free >> 20, used >> 20))
    return None


class Heartbeat:
    """Renews a task's lease from its own thread while POV-Ray runs."""

    def __init__(self, worker, task):
        self.worker = worker
        self.task = task
        self.progress = 0.0
        self.rejected = None
        self.cancelled = False
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True,
                                       name="heartbeat-%d" % task["id"])
        self.client = worker.new_client()

    def start(self):
        self.thread.start()

    def stop(self):
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join(5)
        self.client.close()

    def run(self):
        interval = min(max(self.task["lease_seconds"] / 4.0, 0.5),
                       MAX_HEARTBEAT_SECONDS)
        while not self.stopped.wait(interval * random.uniform(0.8, 1.2)):
            try:
                answer = self.client.call(
                    "POST", "/api/tasks/%d/heartbeat" % self.task["id"],
                    {"attempt": self.task["attempt"],
                     "worker": self.worker.worker_id,
                     "progress": self.progress})
            except (ServerUnreachable, TlsError) as error:
                worker_log.warning("task %d: heartbeat failed (%s)",
                                   self.task["id"], error)
                continue
            except ApiError as error:
                if error.status in (409, 404):
                    self.abandon("server: %s" % error.message)
                    return
                worker_log.warning("task %d: heartbeat response HTTP %d: "
                                   "%s", self.task["id"], error.status,
                                   error.message)
                continue
            if answer.get("action") == "stop":
                self.cancelled = True
                self.abandon("the job was cancelled")
                return

    def abandon(self, reason):
        worker_log.warning("task %d: stopping POV-Ray: %s",
                           self.task["id"], reason)
        self.rejected = reason
        self.worker.terminate_povray()


def windows_output_base(output_base, scene_dir, paths=os.path):
    """Return the output base relative to the scene folder, where
    pvengine runs; ``paths`` is os.path, or ntpath in tests."""
    try:
        return paths.relpath(output_base, scene_dir)
    except ValueError:
        # Different drives: only the full path can name the file.
        return output_base


def read_tail(path, limit):
    """Return the last ``limit`` bytes of a text file, or ""."""
    try:
        with open(path, "rb") as source:
            source.seek(0, io.SEEK_END)
            source.seek(max(source.tell() - limit, 0))
            text = source.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def unpack_archive(archive, folder):
    """Unpack a checked job archive into ``folder``."""
    with zipfile.ZipFile(archive) as source:
        for member in source.infolist():
            if member.filename.endswith("/"):
                continue
            target = os.path.join(folder, *member.filename.split("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with source.open(member) as data, open(target, "wb") as out:
                shutil.copyfileobj(data, out, COPY_CHUNK_BYTES)


def task_label(task):
    if not task["settings"]["animated"]:
        frames = "still"
    elif task["frame_first"] == task["frame_last"]:
        frames = "frame %d" % task["frame_first"]
    else:
        frames = "frames %d-%d" % (task["frame_first"], task["frame_last"])
    if task.get("sliced"):
        frames += " rows %d-%d" % (task["row_first"], task["row_last"])
    return "job %d task %d (%s, %s)" % (task["job_id"], task["id"],
                                        task["job_name"][:30], frames)


ROOT_WORKDIR = "/var/lib/httpov-worker"  # work folder of root's workers


def default_workdir():
    return os.path.join(os.path.expanduser("~"), ".httpov", "worker")


# ===========================================================================
# 10. Command line
# ===========================================================================

JOB_ACTIONS = ("pause", "resume", "cancel", "retry", "delete")
DEFAULT_DATA_DIR = "httpov-data"
DEFAULT_RENDER_OUTPUT = "render-out"
STATUS_POLL_SECONDS = 0.5          # render's progress line refresh
RENDER_WORKERS_PER_CORE = 2
FETCH_POLL_SECONDS = 2.0           # fetch --wait polling interval
EXCLUDED_FROM_JOBS = {".git", ".hg", ".svn", "__pycache__"}


class CommandError(Exception):
    """A CLI failure with a message for the user; exit code 1."""


def pack_job(path):
    """Return (zip path, is temporary) for a job folder, zip or file."""
    if not os.path.exists(path):
        raise CommandError("%s: no such file or folder" % path)
    if os.path.isfile(path) and path.lower().endswith(".zip"):
        return path, False
    members = []
    if os.path.isdir(path):
        for folder, subfolders, files in os.walk(path):
            subfolders[:] = sorted(name for name in subfolders
                                   if name not in EXCLUDED_FROM_JOBS)
            for name in sorted(files):
                full = os.path.join(folder, name)
                if os.path.islink(full) or not os.path.isfile(full):
                    log.warning("skipping %s: not a regular file", full)
                    continue
                relative = os.path.relpath(full, path).replace(os.sep, "/")
                members.append((full, relative))
    elif path.lower().endswith(SCENE_SUFFIXES):
        members.append((path, os.path.basename(path)))
        if path.lower().endswith(".ini"):
            with open(path, errors="replace") as source:
                pairs = read_ini_text(source.read(), path)
            scene = dict(pair for pair in pairs if pair[0]).get(
                "input_file")
            if scene:
                scene_path = os.path.join(os.path.dirname(path), scene)
                if os.path.isfile(scene_path):
                    members.append((scene_path, scene.replace("\\", "/")))
    else:
        raise CommandError("%s is not a folder, .zip, .pov or .ini file"
                           % path)
    if not members:
        raise CommandError("%s contains no files" % path)
    handle, archive_path = tempfile.mkstemp(suffix=".zip",
                                            prefix="httpov-job-")
    os.close(handle)
    with zipfile.ZipFile(archive_path, "w", zipfile.ZIP_DEFLATED) as zipped:
        for full, relative in members:
            zipped.write(full, relative)
    return archive_path, True


def job_options_from_args(args):
    options = {}
    for name in JOB_OPTION_NAMES:
        value = getattr(args, name, None)
        if value is not None:
            options[name] = value
    return options


def submit_job(client, path, options, povray_options):
    """Pack and upload a job; return the server's job summary."""
    archive, temporary = pack_job(path)
    query = [(name, str(value)) for name, value in options.items()]
    query += [("option", option) for option in povray_options]
    if "name" not in options:
        base = os.path.basename(os.path.normpath(path))
        query.append(("name", os.path.splitext(base)[0]))
    try:
        return client.upload("/api/jobs?" + urllib.parse.urlencode(query),
                             archive)
    finally:
        if temporary:
            remove_quietly(archive)


def client_from(args):
    return ApiClient(args.url, token_from(args), cacert=args.cacert,
                     insecure=args.insecure)


def token_from(args):
    token = args.token or os.environ.get("HTTPOV_TOKEN")
    if not token:
        raise CommandError("missing token: pass --token or set "
                           "HTTPOV_TOKEN (run 'httpov.py token' on the "
                           "server to see the tokens)")
    return token


def format_job_line(job):
    progress = 100.0 * job["progress"]
    slices = ""
    if job["slices_per_frame"] > 1:
        slices = "  %d slices/frame" % job["slices_per_frame"]
    return ("%5d  %-10s %5.1f%%  frames %d/%d  tasks %d/%d%s  %s"
            % (job["id"], job["state"], progress, job["frames_done"],
               job["frames"], job["tasks_done"], job["tasks"], slices,
               job["name"]))


def fetch_frames(client, job, output_dir, fetched):
    """Download finished frames not fetched yet; return how many."""
    os.makedirs(output_dir, exist_ok=True)
    count = 0
    for frame in job["done_frames"]:
        if frame in fetched:
            continue
        name = job["frame_files"][str(frame)]
        target = os.path.join(output_dir, name)
        temp_path = target + ".part"
        client.download("/api/jobs/%d/frames/%d.png" % (job["id"], frame),
                        temp_path)
        os.replace(temp_path, target)
        fetched.add(frame)
        count += 1
    return count


def server_tls_context(cert_file, key_file):
    """Load the server's certificate and key; raise CommandError."""
    if bool(cert_file) != bool(key_file):
        raise CommandError("give both --tls-cert and --tls-key")
    if not cert_file:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as error:
        raise CommandError("cannot load certificate %s and key %s: %s"
                           % (cert_file, key_file, error))
    return context


def command_serve(args):
    tls_context = server_tls_context(args.tls_cert, args.tls_key)
    try:
        server = FarmHTTPServer((args.bind, args.port), None,
                                max_connections=args.max_connections,
                                tls_context=tls_context,
                                max_address_connections=(
                                    args.max_address_connections))
    except (OSError, OverflowError) as error:
        raise CommandError("cannot listen on %s port %d: %s; choose "
                           "another --port or --bind"
                           % (args.bind, args.port, error))
    try:
        farm = Farm(args.data, lease_seconds=args.lease,
                    max_attempts=args.max_attempts,
                    busy_seconds=args.busy_timeout,
                    max_job_bytes=args.max_job_mib * (1 << 20),
                    max_result_bytes=args.max_result_mib * (1 << 20),
                    target_task_seconds=args.target_task_seconds)
    except BaseException:
        server.server_close()
        raise
    server.farm = farm
    farm.public_status = args.public_status
    farm.legacy_networks = args.legacy_clients
    farm.legacy_lease_seconds = args.legacy_lease
    farm.recover()
    port = server.server_address[1]
    host = args.bind
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    if ":" in host:
        host = "[%s]" % host
    scheme = "https" if tls_context else "http"
    url = "%s://%s:%d/" % (scheme, host, port)
    client_options = ""
    if tls_context:
        client_options = " --cacert %s" % args.tls_cert
    threading.Thread(target=farm.housekeeping, daemon=True,
                     name="housekeeping").start()
    print("httpov %s serving %s on %s port %d"
          % (__version__, farm.data_dir, args.bind, port))
    print("Status page:  %s?token=%s" % (url, farm.tokens["admin"]))
    print("Start workers: python3 httpov.py work %s --token %s%s"
          % (url, farm.tokens["worker"], client_options))
    print("Submit a job:  python3 httpov.py submit %s SCENE --token %s%s"
          % (url, farm.tokens["admin"], client_options))
    print("HTTPov 0.9 clients (Bash client server URL): %slegacy/%s"
          % (url, farm.tokens["worker"]))
    if farm.legacy_networks:
        print("HTTPov 0.9 clients at the root (%s): server %s:%d"
              % (", ".join(map(str, farm.legacy_networks)), host, port))
    sys.stdout.flush()
    server_log.info("listening on %s port %d", args.bind, port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server_log.info("stopped by Ctrl-C")
    finally:
        farm.stopping.set()
        server.server_close()
    return 0


def command_token(args):
    path = os.path.join(args.data, "tokens.json")
    if not os.path.exists(path):
        raise CommandError("no tokens in %s: start 'httpov.py serve --data "
                           "%s' once to create them" % (args.data, args.data))
    tokens = load_or_create_tokens(args.data, rotate=args.rotate)
    if args.rotate:
        log.info("new tokens written to %s; a running server uses them "
                 "from its next request, so restart the workers with the "
                 "new worker token", path)
    print("admin %s" % tokens["admin"])
    print("worker %s" % tokens["worker"])
    return 0


def find_povray(povray):
    """Return the POV-Ray executable's path, or raise CommandError."""
    found = shutil.which(povray)
    if found is None and os.name == "nt" and povray == "povray":
        # POV-Ray for Windows has no "povray" program, only pvengine.
        for name in WINDOWS_POVRAY_NAMES[::-1]:
            found = shutil.which(name + ".exe")
            if found:
                break
    if found is None:
        raise CommandError("POV-Ray %r not found; install POV-Ray 3.7 or "
                           "pass --povray PATH" % povray)
    return found


def command_work(args):
    """Run ``--tasks`` workers in one process; they split the threads."""
    args.povray = find_povray(args.povray)
    if args.workdir is None and hasattr(os, "geteuid") and \
            os.geteuid() == 0:
        # The render user cannot enter root's home folder.
        args.workdir = ROOT_WORKDIR
    threads = args.threads or os.cpu_count() or 1
    name = args.name or socket.gethostname()
    workers = []
    for slot in range(args.tasks):
        workers.append(Worker(
            args.url, token_from(args),
            name=name if args.tasks == 1 else "%s-%d" % (name, slot + 1),
            group=args.group, povray=args.povray,
            threads=max(1, threads // args.tasks), workdir=args.workdir,
            once=args.once, exit_when_idle=args.exit_when_idle,
            max_task_seconds=args.max_task_time,
            stall_seconds=args.stall_timeout, cacert=args.cacert,
            insecure=args.insecure, user=args.user, sandbox=args.sandbox,
            memory_mib=args.memory_limit, console=args.tasks == 1,
            max_disk_mib=args.max_task_disk))
    presses = [0]

    def on_interrupt(number, frame):
        presses[0] += 1
        if presses[0] == 1:
            sys.stderr.write("\nfinishing the current task; press Ctrl-C "
                             "again to stop now\n")
        else:
            sys.stderr.write("\nstopping POV-Ray and giving the task back\n")
        for worker in workers:
            worker.stop(now=presses[0] > 1)

    signal.signal(signal.SIGINT, on_interrupt)
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, lambda number, frame: [
            worker.stop(now=True) for worker in workers])
    if len(workers) == 1:
        return workers[0].run()
    results = []
    runners = [threading.Thread(target=lambda worker=worker:
                                results.append(worker.run()),
                                name=worker.name, daemon=True)
               for worker in workers]
    for runner in runners:
        runner.start()
    for runner in runners:
        # Short joins let the main thread take Ctrl-C.
        while runner.is_alive():
            runner.join(0.5)
    return max(results or [1])


def command_submit(args):
    client = client_from(args)
    try:
        job = submit_job(client, args.path, job_options_from_args(args),
                         args.povray_options)
    except ApiError as error:
        raise CommandError("submit rejected: %s" % error.message)
    log.info("job %d %r: %s, %s", job["id"], job["name"],
             plural(job["frames"], "frame"), plural(job["tasks"], "task"))
    print(job["id"])
    return 0


def command_status(args):
    client = client_from(args)
    if args.job is None:
        answer = client.call("GET", "/api/jobs")
        if args.json:
            print(json.dumps(answer, indent=1))
        elif not answer["jobs"]:
            print("no jobs")
        for job in [] if args.json else answer["jobs"]:
            print(format_job_line(job))
        return 0
    job = client.call("GET", "/api/jobs/%d" % args.job)
    if args.json:
        print(json.dumps(job, indent=1))
        return 0
    print(format_job_line(job))
    if job["error"]:
        print("error: %s" % job["error"])
    for task in job["failed_tasks"]:
        print("failed task %d (frames %d-%d, rows %d-%d) on worker %s: %s"
              % (task["id"], task["frame_first"], task["frame_last"],
                 task["row_first"], task["row_last"],
                 task["failed_worker"], task["error"]))
    for task in job["running_tasks"]:
        print("running task %d (frames %d-%d) on worker %s: %.0f%%"
              % (task["id"], task["frame_first"], task["frame_last"],
                 task["worker_id"], 100 * task["progress"]))
    return 0


def command_fetch(args):
    client = client_from(args)
    fetched = set()
    paused_reported = False
    while True:
        job = client.call("GET", "/api/jobs/%d" % args.job)
        count = fetch_frames(client, job, args.output, fetched)
        if count:
            log.info("job %d: fetched %d frames into %s", args.job, count,
                     args.output)
        if not args.wait or job["state"] in FINAL_JOB_STATES:
            break
        if job["state"] == "paused" and not paused_reported:
            log.info("job %d is paused; waiting until it is resumed",
                     args.job)
        paused_reported = job["state"] == "paused"
        time.sleep(FETCH_POLL_SECONDS)
    if len(fetched) == job["frames"]:
        print("job %d: all %s in %s" % (args.job,
                                        plural(len(fetched), "frame"),
                                        args.output))
        return 0
    message = ("job %d is %s: %d of %d frames fetched into %s"
               % (args.job, job["state"], len(fetched), job["frames"],
                  args.output))
    if job["error"]:
        message += "\nerror: %s" % job["error"]
    raise CommandError(message)


def command_job(args):
    client = client_from(args)
    changes = {}
    if args.priority is not None:
        changes["priority"] = args.priority
    if args.max_workers is not None:
        changes["max_workers"] = args.max_workers
    # The action goes first: when it is refused, nothing has changed.
    if args.action:
        answer = client.call("POST", "/api/jobs/%d/%s" % (args.job,
                                                          args.action))
        print("job %d: %s" % (args.job, answer["state"]))
    if changes and args.action != "delete":
        job = client.call("POST", "/api/jobs/%d" % args.job, changes)
        print("job %d: priority %d, max workers %d"
              % (job["id"], job["priority"], job["max_workers"]))
    return 0


def command_render(args):
    """Render a scene on this machine: embedded server plus workers."""
    find_povray(args.povray)
    os.makedirs(args.output, exist_ok=True)
    if not args.verbose:
        # The progress line replaces the per-task log lines.
        server_log.setLevel(logging.WARNING)
        worker_log.setLevel(logging.WARNING)
    cores = os.cpu_count() or 1
    # Two one-thread workers per core: POV-Ray spends most of its start-up
    # (about 0.7 s) waiting, which the second process on a core fills.
    workers = args.workers or RENDER_WORKERS_PER_CORE * cores
    threads = max(1, cores // workers)
    render_user(args.user)
    temp_dir = tempfile.mkdtemp(prefix="httpov-render-")
    if args.user:
        # The render user must reach its task folders inside.
        os.chmod(temp_dir, 0o755)
    farm = Farm(os.path.join(temp_dir, "data"), lease_seconds=args.lease)
    server = FarmHTTPServer(("127.0.0.1", 0), farm)
    url = "http://127.0.0.1:%d/" % server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True,
                     name="server").start()
    threading.Thread(target=farm.housekeeping, daemon=True,
                     name="housekeeping").start()
    client = ApiClient(url, farm.tokens["admin"])
    pool = []

    def on_terminate(number, frame):
        raise KeyboardInterrupt

    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, on_terminate)
    try:
        try:
            job = submit_job(client, args.path, job_options_from_args(args),
                             args.povray_options)
        except ApiError as error:
            raise CommandError("cannot render %s: %s" % (args.path,
                                                         error.message))
        for number in range(workers):
            worker = Worker(url, farm.tokens["worker"],
                            name="local-%d" % (number + 1),
                            povray=args.povray, threads=threads,
                            workdir=os.path.join(temp_dir, "worker-%d"
                                                 % number),
                            console=False, user=args.user,
                            sandbox=args.sandbox,
                            memory_mib=args.memory_limit,
                            max_disk_mib=args.max_task_disk)
            thread = threading.Thread(target=worker.run, daemon=True,
                                      name=worker.name)
            thread.start()
            pool.append((worker, thread))
        log.info("rendering job %d %r: %s, %s, %s with %s each",
                 job["id"], job["name"], plural(job["frames"], "frame"),
                 plural(job["tasks"], "task"), plural(workers, "worker"),
                 plural(threads, "thread"))
        fetched = set()
        started = time.time()
        line = None
        while True:
            job = client.call("GET", "/api/jobs/%d" % job["id"])
            fetch_frames(client, job, args.output, fetched)
            line = show_render_progress(job, time.time() - started, line)
            if job["state"] in FINAL_JOB_STATES:
                break
            time.sleep(STATUS_POLL_SECONDS)
        if sys.stderr.isatty():
            sys.stderr.write("\n")
        if job["state"] != "done":
            lines = ["render %s: %s" % (job["state"], job["error"] or "")]
            for task in job["failed_tasks"][:5]:
                lines.append("  task %d: %s" % (task["id"], task["error"]))
            raise CommandError("\n".join(lines))
        print("%s in %s (%.1f s)" % (plural(len(fetched), "frame"),
                                     args.output, time.time() - started))
        return 0
    except KeyboardInterrupt:
        sys.stderr.write("\nrender interrupted\n")
        return 130
    finally:
        for worker, _ in pool:
            worker.stop(now=True)
        for _, thread in pool:
            thread.join(10)
        farm.stopping.set()
        server.shutdown()
        server.server_close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def show_render_progress(job, elapsed, last_line):
    """Print render's progress line; return the line printed.

    On a terminal the line is rewritten in place. Elsewhere (a log
    file) a line is printed only when the numbers change.
    """
    fraction = job["progress"]
    line = ("%s: %3.0f%%  frames %d/%d  tasks %d/%d (%d running)"
            % (job["name"][:30], 100 * fraction, job["frames_done"],
               job["frames"], job["tasks_done"], job["tasks"],
               job["tasks_running"]))
    if sys.stderr.isatty():
        sys.stderr.write("\r%s  %.0f s" % (line, elapsed))
    elif line != last_line:
        sys.stderr.write("%s  %.0f s\n" % (line, elapsed))
    sys.stderr.flush()
    return line


def whole_number(minimum):
    """argparse type factory: a whole number of at least ``minimum``."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError("invalid number %r" % text)
        if value < minimum:
            raise argparse.ArgumentTypeError("must be at least %d, not %d"
                                             % (minimum, value))
        return value
    return parse


positive_int = whole_number(1)


def port_number(text):
    """argparse type: a TCP port, 0 to 65535 (0: any free port)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("invalid port %r" % text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError("port must be 0 to 65535, not %d"
                                         % value)
    return value


def seconds(minimum):
    """argparse type factory: a duration of at least ``minimum`` s."""
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError("invalid duration %r" % text)
        if not value >= minimum:
            raise argparse.ArgumentTypeError(
                "must be at least %g seconds, not %s" % (minimum, text))
        return value
    return parse


def add_job_options(parser):
    group = parser.add_argument_group(
        "job options", "POV-Ray options go after --, for example "
        "'-- +W640 +H480 +A0.3'")
    group.add_argument("--name", help="job name (default: the file name)")
    group.add_argument("--frames", metavar="FIRST-LAST",
                       help="render only these frames of the animation")
    group.add_argument("--slices", type=int, metavar="N",
                       help="split every frame into about N slices")
    group.add_argument("--rows-per-slice", type=int, metavar="R",
                       dest="rows_per_slice",
                       help="split every frame into slices of R rows "
                       "(rounded up to POV-Ray's render block size, 32)")
    group.add_argument("--frames-per-task", type=int, metavar="N",
                       dest="frames_per_task",
                       help="frames in one task (default: adaptive, "
                       "growing toward the server's target task length)")
    group.add_argument("--max-workers", type=int, metavar="N",
                       dest="max_workers",
                       help="workers on this job at once (0: no limit)")
    group.add_argument("--priority", type=int, metavar="P",
                       help="higher priorities are rendered first "
                       "(default 0)")
    group.add_argument("--scene", metavar="FILE",
                       help="the .ini or .pov inside the job to render, "
                       "when the job holds several")


def networks(text):
    """Parse "CIDR[,CIDR...]" for --legacy-clients."""
    parsed = []
    for part in text.split(","):
        try:
            parsed.append(ipaddress.ip_network(part.strip(), strict=False))
        except ValueError:
            raise argparse.ArgumentTypeError(
                "%r is not a network; write it as 192.168.1.0/24, "
                "10.0.0.7 or fd00::/8" % part.strip())
    return parsed


def build_parser():
    parser = argparse.ArgumentParser(
        prog="httpov.py",
        description="A distributed POV-Ray render farm: serve, work, "
        "submit, status, fetch, job, render.")
    parser.add_argument("--version", action="version",
                        version="httpov " + __version__)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log debug messages")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    # -v also works after the command; SUPPRESS keeps the subcommand from
    # resetting a -v given before it.
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true",
                         default=argparse.SUPPRESS,
                         help="log debug messages")
    original_add_parser = commands.add_parser
    tls = argparse.ArgumentParser(add_help=False)
    tls.add_argument("--cacert", metavar="FILE",
                     help="CA certificate (PEM) that signed the server's "
                     "HTTPS certificate")
    tls.add_argument("--insecure", action="store_true",
                     help="do not verify the server's HTTPS certificate")

    render_options = argparse.ArgumentParser(add_help=False)
    render_options.add_argument(
        "--user", default=os.environ.get("HTTPOV_USER"), metavar="NAME",
        help="unprivileged user that POV-Ray runs as; needed when the "
        "worker runs as root (default: $HTTPOV_USER)")
    render_options.add_argument(
        "--sandbox", choices=("auto", "bwrap", "none"), default="auto",
        help="confine POV-Ray with bubblewrap: auto uses it when "
        "installed (default auto)")
    render_options.add_argument(
        "--memory-limit", type=positive_int, dest="memory_limit",
        metavar="MIB", help="address space of POV-Ray in MiB (default "
        "%d + %d per thread)" % (DEFAULT_MEMORY_MIB, MEMORY_MIB_PER_THREAD))
    render_options.add_argument(
        "--max-task-disk", type=whole_number(0), dest="max_task_disk",
        default=DEFAULT_MAX_TASK_DISK_MIB, metavar="MIB",
        help="stop POV-Ray when the files of its task, the scene's copy "
        "included, grow past this many MiB, and report the task failed "
        "(default %d; 0: no limit, and no check of the free space)"
        % DEFAULT_MAX_TASK_DISK_MIB)

    def add_parser(name, **options):
        parents = [verbose]
        if name in ("work", "submit", "status", "fetch", "job"):
            parents.append(tls)
        if name in ("work", "render"):
            parents.append(render_options)
        return original_add_parser(name, parents=parents, **options)

    commands.add_parser = add_parser

    serve = commands.add_parser("serve", help="run the server")
    serve.add_argument("--bind", default="0.0.0.0",
                       help="address to listen on (default 0.0.0.0, all)")
    serve.add_argument("--port", type=port_number, default=DEFAULT_PORT,
                       help="TCP port (default %d)" % DEFAULT_PORT)
    serve.add_argument("--data", default=DEFAULT_DATA_DIR,
                       help="data folder (default ./%s)" % DEFAULT_DATA_DIR)
    serve.add_argument("--lease", type=seconds(MIN_LEASE_SECONDS),
                       default=DEFAULT_LEASE_SECONDS,
                       metavar="SECONDS",
                       help="lease length in seconds (default %d)"
                       % DEFAULT_LEASE_SECONDS)
    serve.add_argument("--max-attempts", type=positive_int,
                       dest="max_attempts",
                       default=DEFAULT_MAX_ATTEMPTS, metavar="N",
                       help="attempts per task before its job fails "
                       "(default %d)" % DEFAULT_MAX_ATTEMPTS)
    serve.add_argument("--max-job-mib", type=float, dest="max_job_mib",
                       default=MAX_JOB_BYTES >> 20, metavar="MIB",
                       help="largest job upload in MiB (default %d)"
                       % (MAX_JOB_BYTES >> 20))
    serve.add_argument("--max-result-mib", type=float,
                       dest="max_result_mib",
                       default=MAX_RESULT_BYTES >> 20, metavar="MIB",
                       help="largest task result upload in MiB "
                       "(default %d)" % (MAX_RESULT_BYTES >> 20))
    serve.add_argument("--target-task-seconds", type=seconds(1),
                       default=DEFAULT_TARGET_TASK_SECONDS,
                       dest="target_task_seconds", metavar="SECONDS",
                       help="length that adaptive tasks grow toward "
                       "(default %d)" % DEFAULT_TARGET_TASK_SECONDS)
    serve.add_argument("--tls-cert", metavar="FILE",
                       help="serve HTTPS with this PEM certificate (chain)")
    serve.add_argument("--tls-key", metavar="FILE",
                       help="the PEM private key of --tls-cert")
    serve.add_argument("--public-status", action="store_true",
                       help="let anyone read the status page and job "
                       "progress without logging in")
    serve.add_argument("--max-connections", type=positive_int,
                       default=DEFAULT_MAX_CONNECTIONS, metavar="N",
                       help="connections handled at once; more get 503 "
                       "(default %d)" % DEFAULT_MAX_CONNECTIONS)
    serve.add_argument("--max-address-connections", type=positive_int,
                       dest="max_address_connections",
                       default=DEFAULT_MAX_ADDRESS_CONNECTIONS, metavar="N",
                       help="connections handled at once from one client "
                       "address; more get 503 (default %d; raise it for "
                       "many workers behind one NAT address)"
                       % DEFAULT_MAX_ADDRESS_CONNECTIONS)
    serve.add_argument("--legacy-clients", type=networks,
                       dest="legacy_clients", default=[],
                       metavar="CIDR[,CIDR...]",
                       help="let original HTTPov clients from these "
                       "networks use /httpov.php at the server root "
                       "(the Python client needs this); any address "
                       "can use /legacy/WORKER-TOKEN/httpov.php")
    serve.add_argument("--legacy-lease", type=seconds(MIN_LEASE_SECONDS),
                       dest="legacy_lease",
                       default=DEFAULT_LEGACY_LEASE_SECONDS,
                       metavar="SECONDS",
                       help="lease of a batch of an HTTPov client, which "
                       "pings every %d s (default %d)"
                       % (LEGACY_PING_SECONDS, DEFAULT_LEGACY_LEASE_SECONDS))
    serve.add_argument("--busy-timeout", type=seconds(0),
                       dest="busy_timeout",
                       default=SQLITE_BUSY_SECONDS, metavar="SECONDS",
                       help="wait this long for a locked database before "
                       "answering 503 (default %.0f)" % SQLITE_BUSY_SECONDS)

    token = commands.add_parser("token", help="print the server's tokens")
    token.add_argument("--data", default=DEFAULT_DATA_DIR,
                       help="data folder (default ./%s)" % DEFAULT_DATA_DIR)
    token.add_argument("--rotate", action="store_true",
                       help="replace both tokens with new ones")

    work = commands.add_parser("work", help="render tasks from a server")
    work.add_argument("url", help="server URL, e.g. http://HOST:8080/")
    work.add_argument("--token", help="worker token (or HTTPOV_TOKEN)")
    work.add_argument("--name", help="worker name (default: host name)")
    work.add_argument("--group", default="", help="worker group")
    work.add_argument("--povray", default="povray",
                      help="POV-Ray executable (default: povray)")
    work.add_argument("--threads", type=positive_int, metavar="N",
                      help="render threads (default: every core)")
    work.add_argument("--workdir", metavar="DIR",
                      help="cache and scratch folder (default %s, or "
                      "%s as root)" % (default_workdir(), ROOT_WORKDIR))
    work.add_argument("--tasks", type=positive_int, default=1, metavar="N",
                      help="render N tasks at once, splitting the threads "
                      "between them, to hide POV-Ray's start-up time "
                      "(default 1)")
    work.add_argument("--once", action="store_true",
                      help="render at most one task, then exit")
    work.add_argument("--exit-when-idle", type=seconds(0), default=0,
                      dest="exit_when_idle", metavar="SECONDS",
                      help="exit when the farm has had no task for this "
                      "worker this long, as batch jobs should (default "
                      "0: keep waiting)")
    work.add_argument("--max-task-time", type=seconds(0),
                      default=DEFAULT_MAX_TASK_SECONDS,
                      dest="max_task_time", metavar="SECONDS",
                      help="stop POV-Ray after this long and report the "
                      "task failed (default %d; 0: no limit)"
                      % DEFAULT_MAX_TASK_SECONDS)
    work.add_argument("--stall-timeout", type=seconds(0),
                      default=DEFAULT_STALL_SECONDS, dest="stall_timeout",
                      metavar="SECONDS",
                      help="stop POV-Ray when it prints nothing for this "
                      "long (default %d; 0: no limit)"
                      % DEFAULT_STALL_SECONDS)

    submit = commands.add_parser("submit", help="submit a job")
    submit.add_argument("url", help="server URL")
    submit.add_argument("path", help="folder, .zip, .pov or .ini file")
    submit.add_argument("--token", help="admin token (or HTTPOV_TOKEN)")
    add_job_options(submit)

    status = commands.add_parser("status", help="show jobs")
    status.add_argument("url", help="server URL")
    status.add_argument("job", nargs="?", type=int, help="job id")
    status.add_argument("--token", help="admin token (or HTTPOV_TOKEN)")
    status.add_argument("--json", action="store_true",
                        help="print the API's JSON")

    fetch = commands.add_parser("fetch", help="download finished frames")
    fetch.add_argument("url", help="server URL")
    fetch.add_argument("job", type=int, help="job id")
    fetch.add_argument("--token", help="admin token (or HTTPOV_TOKEN)")
    fetch.add_argument("-o", "--output", default=".",
                       help="folder for the PNGs (default: .)")
    fetch.add_argument("--wait", action="store_true",
                       help="wait until the job ends")

    job = commands.add_parser(
        "job", help="pause, resume, cancel, retry, delete or change a job",
        description="pause: hand out no more tasks (running ones finish). "
        "resume: undo pause. cancel: stop the job; its workers stop at "
        "their next heartbeat. retry: requeue failed tasks of a failed, "
        "cancelled or running job. delete: remove the job and its files.")
    job.add_argument("url", help="server URL")
    job.add_argument("job", type=int, help="job id")
    job.add_argument("action", nargs="?", choices=JOB_ACTIONS)
    job.add_argument("--token", help="admin token (or HTTPOV_TOKEN)")
    job.add_argument("--priority", type=int, help="new priority")
    job.add_argument("--max-workers", type=int, dest="max_workers",
                     help="new worker limit (0: no limit)")

    render = commands.add_parser(
        "render", help="render on this machine with local workers")
    render.add_argument("path", help="folder, .zip, .pov or .ini file")
    render.add_argument("-o", "--output", default=DEFAULT_RENDER_OUTPUT,
                        help="folder for the PNGs (default ./%s)"
                        % DEFAULT_RENDER_OUTPUT)
    render.add_argument("--workers", type=positive_int, metavar="N",
                        help="local workers (default: two per core)")
    render.add_argument("--povray", default="povray",
                        help="POV-Ray executable (default: povray)")
    render.add_argument("--lease", type=seconds(MIN_LEASE_SECONDS),
                        default=DEFAULT_LEASE_SECONDS, help=argparse.SUPPRESS)
    add_job_options(render)
    return parser


COMMANDS = {
    "serve": command_serve, "token": command_token, "work": command_work,
    "submit": command_submit, "status": command_status,
    "fetch": command_fetch, "job": command_job, "render": command_render,
}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    povray_options = []
    if "--" in argv:
        split = argv.index("--")
        argv, povray_options = argv[:split], argv[split + 1:]
    if argv and argv[0] == "job":
        # argparse cannot read an optional positional that comes after
        # options ("job URL 3 --token T pause"), so move it forward.
        for index, word in enumerate(argv[1:], 1):
            if word in JOB_ACTIONS and index > 3:
                argv.insert(3, argv.pop(index))
                break
    misplaced = [word for word in argv[1:] if word[:1] == "+"]
    if misplaced:
        build_parser().error("%s looks like a POV-Ray option; put POV-Ray "
                             "options after --, as in 'submit URL PATH -- "
                             "+W640 +H480'" % misplaced[0])
    args = build_parser().parse_args(argv)
    if args.command == "job" and args.action is None and \
            args.priority is None and args.max_workers is None:
        build_parser().error("job: nothing to do; give an action (pause, "
                             "resume, cancel, retry, delete) or --priority "
                             "or --max-workers")
    args.povray_options = povray_options
    if povray_options and args.command not in ("submit", "render"):
        build_parser().error("POV-Ray options after -- are only for submit "
                             "and render")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return COMMANDS[args.command](args)
    except (CommandError, UserError) as error:
        sys.stderr.write("httpov: %s\n" % error)
        return 1
    except ApiError as error:
        sys.stderr.write("httpov: server responded %d: %s\n"
                         % (error.status, error.message))
        return 1
    except (ServerUnreachable, TlsError) as error:
        sys.stderr.write("httpov: %s\n" % error)
        return 1
    except OSError as error:
        sys.stderr.write("httpov: %s\n" % error)
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
