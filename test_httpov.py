"""Tests for httpov.py, grouped in the order of its sections.

Run with ``python3 -m unittest -v test_httpov``. Tests that need POV-Ray
or Pillow skip without them, unless HTTPOV_CI=1 is set (as .ci/run
does), which turns a missing tool into a failure.
"""

import ast
import http.client
import io
import ipaddress
import json
import logging
import ntpath
import os
import random
import re
import shlex
import shutil
import signal
import socket
import ssl
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import types
import unittest
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib

import httpov

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = os.path.join(HERE, "examples")
POVRAY = shutil.which("povray")
IN_CI = os.environ.get("HTTPOV_CI") == "1"

try:
    from PIL import Image
except ImportError:
    Image = None

# Workers refuse to render as root, so as root the tests render as the
# unprivileged user "nobody".
if hasattr(os, "geteuid") and os.geteuid() == 0:
    os.environ.setdefault("HTTPOV_USER", "nobody")


def make_temp_dir(**options):
    """Make a temporary folder that the render user can enter."""
    path = tempfile.mkdtemp(**options)
    os.chmod(path, 0o755)
    return path


def needs_povray(test):
    """Skip a test without POV-Ray, or fail it in CI."""
    if POVRAY or IN_CI:
        return test
    return unittest.skip("POV-Ray is not installed")(test)


def needs_tool(name):
    """Skip a test without the program ``name``, or fail it in CI."""
    def decorate(test):
        if shutil.which(name) or IN_CI:
            return test
        return unittest.skip("%s is not installed" % name)(test)
    return decorate


def needs_pillow(test):
    if Image is not None or IN_CI:
        return test
    return unittest.skip("Pillow is not installed")(test)


def make_zip(path, members):
    """Write a zip; members maps names to bytes or ZipInfo tweaks."""
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def fill_scene(path):
    """Return a scene that writes about 260 MB to ``path``, 19 MB a
    second on the test machine, unless something stops it."""
    return (b'#fopen Fill "%s" write\n'
            b"#declare Count = 0;\n"
            b"#while (Count < 4000000)\n"
            b'  #write (Fill, "%s\\n")\n'
            b"  #declare Count = Count + 1;\n"
            b"#end\n#fclose Fill\n" % (path, b"x" * 64)) + SPHERE_SCENE


SPHERE_SCENE = b"""
camera { location <0, 1, -4> look_at <0, 0.5, 0> }
light_source { <3, 5, -4> color rgb 1 }
plane { y, 0 pigment { checker color rgb 0.2 color rgb 0.9 } }
sphere { <0, 0.8, 0>, 0.8
  pigment { color rgb <clock, 0.4, 1 - clock> }
  finish { specular 0.6 reflection 0.2 } }
"""


# ---------------------------------------------------------------------------
# 1. The module itself: what it imports
# ---------------------------------------------------------------------------

# Modules removed from Python 3.12 and 3.13 (PEP 594 and PEP 632), and
# others that old or minimal Pythons may lack at module level.
REMOVED_MODULES = {
    "aifc", "asynchat", "asyncore", "audioop", "cgi", "cgitb", "chunk",
    "crypt", "distutils", "imghdr", "imp", "mailcap", "msilib", "nis",
    "nntplib", "ossaudiodev", "pipes", "smtpd", "sndhdr", "spwd", "sunau",
    "telnetlib", "uu", "xdrlib", "lib2to3",
}
# Imported inside the functions that need them, where they exist.
LATE_MODULES = {"sqlite3", "pwd", "resource"}


class ModuleTest(unittest.TestCase):

    def imports(self):
        with open(os.path.join(HERE, "httpov.py")) as source:
            tree = ast.parse(source.read())
        top, nested = set(), set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = ([alias.name for alias in node.names]
                         if isinstance(node, ast.Import) else [node.module])
                target = top if node.col_offset == 0 else nested
                target.update(name.split(".")[0] for name in names)
        return top, nested

    def test_no_removed_module_is_imported(self):
        top, nested = self.imports()
        self.assertEqual((top | nested) & REMOVED_MODULES, set())

    def test_only_standard_modules_at_top(self):
        top, _ = self.imports()
        self.assertEqual(top & LATE_MODULES, set(),
                         "sqlite3, pwd and resource are imported late")
        for name in top:
            with self.subTest(module=name):
                __import__(name)
                self.assertNotIn("site-packages",
                                 getattr(sys.modules[name], "__file__",
                                         "") or "")


# ---------------------------------------------------------------------------
# 2. POV-Ray settings
# ---------------------------------------------------------------------------

class SettingsTest(unittest.TestCase):

    def test_switch_width_and_height(self):
        self.assertEqual(httpov.parse_switch("+W640"), ("width", "640"))
        self.assertEqual(httpov.parse_switch("+h480"), ("height", "480"))

    def test_switch_animation(self):
        self.assertEqual(httpov.parse_switch("+KFI0"),
                         ("initial_frame", "0"))
        self.assertEqual(httpov.parse_switch("+KFF24"),
                         ("final_frame", "24"))
        self.assertEqual(httpov.parse_switch("+KC"), ("cyclic", True))
        self.assertEqual(httpov.parse_switch("-KC"), ("cyclic", False))

    def test_switch_not_read_by_farm(self):
        self.assertEqual(httpov.parse_switch("+A0.3"), (None, None))
        self.assertEqual(httpov.parse_switch("+Q9"), (None, None))

    def test_switch_output_type(self):
        self.assertEqual(httpov.parse_switch("+FN16"),
                         ("file_type", "N16"))
        self.assertEqual(httpov.parse_switch("+UA"), ("alpha", True))

    def test_ini_keys_comments_switches(self):
        pairs = httpov.read_ini_text(
            "; a comment\nWidth = 320 ; trailing\n+H200\n"
            "Input_File_Name=\"scene.pov\"\nAntialias=on\n")
        settings = dict(pair for pair in pairs if pair[0])
        self.assertEqual(settings["width"], "320")
        self.assertEqual(settings["height"], "200")
        self.assertEqual(settings["input_file"], "scene.pov")

    def test_ini_stops_at_first_section(self):
        pairs = httpov.read_ini_text("Width=20\n[big]\nWidth=40\n")
        self.assertEqual(pairs, [("width", "20")])

    def test_ini_rejects_shell_commands(self):
        with self.assertRaisesRegex(httpov.UserError, "shell command"):
            httpov.read_ini_text("Pre_Scene_Command=rm -rf /\n")

    def test_ini_rejects_include_ini(self):
        with self.assertRaisesRegex(httpov.UserError, "Include_Ini"):
            httpov.read_ini_text("Width=64\nInclude_Ini=extra.cfg\n")

    def test_ini_rejects_nested_ini(self):
        with self.assertRaisesRegex(httpov.UserError, "nested INI"):
            httpov.read_ini_text("other.ini\n")

    def test_options_reject_farm_settings(self):
        for option in ("+Oout.png", "+SR10", "+ER20", "+SF2", "+EF3",
                       "+SC5", "Output_File_Name=x.png", "+GF/tmp/x",
                       "+GIcopy.ini", "All_File=../log.txt"):
            with self.subTest(option=option):
                with self.assertRaises(httpov.UserError):
                    httpov.read_povray_options([option])

    def test_options_reject_garbage(self):
        with self.assertRaisesRegex(httpov.UserError, "expected a switch"):
            httpov.read_povray_options(["scene"])
        with self.assertRaisesRegex(httpov.UserError, "starts a comment"):
            httpov.read_povray_options(["+W64;+O/tmp/x"])
        with self.assertRaisesRegex(httpov.UserError, "line break"):
            httpov.read_povray_options(["+W10\n+H10"])

    def test_defaults_match_povray(self):
        settings = httpov.resolve_settings([])
        self.assertEqual((settings["width"], settings["height"]),
                         (800, 600))
        self.assertFalse(settings["animated"])
        self.assertEqual(settings["depth"], 8)
        self.assertEqual(settings["block_size"], 32)

    def test_later_options_win(self):
        pairs = httpov.read_ini_text("Width=320\nHeight=240\n")
        pairs += httpov.read_povray_options(["+W640", "+FN16", "+UA"])
        settings = httpov.resolve_settings(pairs)
        self.assertEqual(settings["width"], 640)
        self.assertEqual(settings["height"], 240)
        self.assertEqual(settings["depth"], 16)
        self.assertTrue(settings["alpha"])

    def test_animation_settings(self):
        settings = httpov.resolve_settings(httpov.read_ini_text(
            "Initial_Frame=1\nFinal_Frame=30\nCyclic_Animation=on\n"))
        self.assertTrue(settings["animated"])
        self.assertTrue(settings["cyclic"])
        self.assertEqual((settings["initial_frame"],
                          settings["final_frame"]), (1, 30))

    def test_reversed_animation_rejected(self):
        with self.assertRaisesRegex(httpov.UserError, "comes before"):
            httpov.resolve_settings([("initial_frame", "10"),
                                     ("final_frame", "2")])

    def test_size_limits(self):
        for pairs in ([("width", "0")], [("height", "-5")],
                      [("width", "abc")], [("width", "100000")]):
            with self.subTest(pairs=pairs):
                with self.assertRaises(httpov.UserError):
                    httpov.resolve_settings(pairs)

    def test_ini_rows_rejected(self):
        with self.assertRaisesRegex(httpov.UserError, "Start Row"):
            httpov.resolve_settings([("start_row", "10")])


# ---------------------------------------------------------------------------
# 3. Jobs: archives, scenes and task splitting
# ---------------------------------------------------------------------------

class SliceTest(unittest.TestCase):

    def test_unsliced_is_one_range(self):
        self.assertEqual(httpov.plan_slices(600, 32), [(1, 600)])

    def test_slices_start_on_block_rows(self):
        ranges = httpov.plan_slices(600, 32, slices=4)
        self.assertEqual(ranges, [(1, 160), (161, 320), (321, 480),
                                  (481, 600)])
        for first, _ in ranges:
            self.assertEqual((first - 1) % 32, 0)

    def test_height_not_multiple_of_block(self):
        ranges = httpov.plan_slices(100, 32, rows_per_slice=32)
        self.assertEqual(ranges, [(1, 32), (33, 64), (65, 96), (97, 100)])

    def test_slices_cover_every_row_once(self):
        for height in (1, 2, 31, 32, 33, 63, 64, 65, 479, 1080):
            for count in (1, 2, 3, 7, 50):
                with self.subTest(height=height, count=count):
                    ranges = httpov.plan_slices(
                        height, 32, slices=min(count, height))
                    rows = [row for first, last in ranges
                            for row in range(first, last + 1)]
                    self.assertEqual(rows, list(range(1, height + 1)))

    def test_one_row_image(self):
        self.assertEqual(httpov.plan_slices(1, 32, slices=1), [(1, 1)])
        self.assertEqual(httpov.plan_slices(1, 32, rows_per_slice=1),
                         [(1, 1)])

    def test_no_slice_ends_at_row_one(self):
        ranges = httpov.plan_slices(10, 1, rows_per_slice=1)
        self.assertEqual(ranges[0], (1, 2))
        self.assertTrue(all(last > 1 for _, last in ranges))

    def test_custom_block_size(self):
        ranges = httpov.plan_slices(100, 16, rows_per_slice=20)
        self.assertEqual(ranges[:2], [(1, 32), (33, 64)])

    def test_more_slices_than_blocks(self):
        ranges = httpov.plan_slices(64, 32, slices=10)
        self.assertEqual(ranges, [(1, 32), (33, 64)])


class TaskPlanTest(unittest.TestCase):

    def test_single_frame(self):
        tasks = list(httpov.plan_tasks(0, 0, [(1, 240)], 1))
        self.assertEqual(tasks, [(0, 0, 1, 240)])

    def test_frames_per_task(self):
        tasks = list(httpov.plan_tasks(1, 10, [(1, 240)], 4))
        self.assertEqual([(first, last) for first, last, _, _ in tasks],
                         [(1, 4), (5, 8), (9, 10)])

    def test_frame_subset(self):
        tasks = list(httpov.plan_tasks(5, 7, [(1, 240)], 1))
        self.assertEqual([task[0] for task in tasks], [5, 6, 7])

    def test_preview_order_spreads_first_frames(self):
        order = list(httpov.preview_order(1, 64, preview=4))
        self.assertEqual(order[:4], [1, 17, 33, 49])
        self.assertEqual(sorted(order), list(range(1, 65)))

    def test_adaptive_plan_one_frame_each(self):
        tasks = list(httpov.plan_tasks(1, 40, [(1, 10)], 0))
        self.assertEqual(len(tasks), 40)
        self.assertEqual([task[0] for task in tasks[:3]], [1, 5, 9])

    def test_sliced_animation(self):
        tasks = list(httpov.plan_tasks(1, 2, [(1, 32), (33, 50)], 5))
        self.assertEqual(tasks, [(1, 1, 1, 32), (1, 1, 33, 50),
                                 (2, 2, 1, 32), (2, 2, 33, 50)])


class ArchiveTest(unittest.TestCase):

    def setUp(self):
        self.folder = make_temp_dir()
        self.addCleanup(shutil.rmtree, self.folder)

    def archive(self, members):
        return make_zip(os.path.join(self.folder, "job.zip"), members)

    def test_plain_layout(self):
        layout = httpov.inspect_archive(self.archive(
            {"scene.pov": b"x", "inc/a.inc": b"y"}))
        self.assertEqual(layout["root"], "")
        self.assertEqual(layout["files"], ["inc/a.inc", "scene.pov"])

    def test_httpov_layout_has_root_folder(self):
        layout = httpov.inspect_archive(self.archive(
            {"demo/pov.ini": b"Input_File_Name=demo.pov\n",
             "demo/demo.pov": b"x"}))
        self.assertEqual(layout["root"], "demo/")
        self.assertEqual(layout["files"], ["demo.pov", "pov.ini"])

    def test_hostile_names_rejected(self):
        for name in ("/etc/passwd", "../escape.pov", "a/../../b.pov",
                     "C:/windows.pov", "a\\b.pov", "./x/./y.pov"):
            with self.subTest(name=name):
                path = self.archive({name: b"x"})
                with self.assertRaises(httpov.UserError):
                    httpov.inspect_archive(path)

    def test_control_characters_rejected(self):
        for name in ("a\nCreate_Ini=x.pov", "tab\there.inc", "bell\x07"):
            with self.subTest(name=name):
                with self.assertRaisesRegex(httpov.UserError,
                                            "control character"):
                    httpov.check_member_name(name)

    def test_symlink_rejected(self):
        path = os.path.join(self.folder, "link.zip")
        with zipfile.ZipFile(path, "w") as archive:
            info = zipfile.ZipInfo("link.pov")
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, "/etc/passwd")
        with self.assertRaisesRegex(httpov.UserError, "symbolic link"):
            httpov.inspect_archive(path)

    def test_duplicate_names_rejected(self):
        path = os.path.join(self.folder, "dup.zip")
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("a.pov", "x")
            archive.writestr("A.POV", "y")
        with self.assertRaisesRegex(httpov.UserError, "twice"):
            httpov.inspect_archive(path)

    def test_zip_bomb_rejected(self):
        path = os.path.join(self.folder, "bomb.zip")
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("big.pov", b"\0" * (50 << 20))
        with self.assertRaisesRegex(httpov.UserError, "zip bomb"):
            httpov.inspect_archive(path)

    def test_not_a_zip(self):
        path = os.path.join(self.folder, "bad.zip")
        with open(path, "wb") as out:
            out.write(b"not a zip")
        with self.assertRaisesRegex(httpov.UserError, "not a valid zip"):
            httpov.inspect_archive(path)

    def test_choose_single_ini(self):
        layout = {"files": ["a.ini", "a.pov", "b.pov"]}
        self.assertEqual(httpov.choose_scene(layout), ("a.ini", None))

    def test_choose_single_pov(self):
        layout = {"files": ["a.pov", "inc/x.inc"]}
        self.assertEqual(httpov.choose_scene(layout), (None, "a.pov"))

    def test_choose_ambiguous(self):
        with self.assertRaisesRegex(httpov.UserError, "--scene"):
            httpov.choose_scene({"files": ["a.pov", "b.pov"]})

    def test_prepare_job_frames_and_subset(self):
        path = self.archive({
            "anim.ini": b"Input_File_Name=anim.pov\nInitial_Frame=1\n"
                        b"Final_Frame=30\nCyclic_Animation=on\n",
            "anim.pov": SPHERE_SCENE})
        plan = httpov.prepare_job(path, {"frames": "5-9"})
        self.assertEqual((plan["first_frame"], plan["last_frame"]), (5, 9))
        self.assertEqual(plan["task_count"], 5)
        self.assertTrue(plan["settings"]["cyclic"])
        self.assertEqual(plan["name"], "anim")

    def test_prepare_job_subset_out_of_range(self):
        path = self.archive({
            "anim.ini": b"Input_File_Name=anim.pov\nFinal_Frame=10\n",
            "anim.pov": SPHERE_SCENE})
        with self.assertRaisesRegex(httpov.UserError, "frames 1-10"):
            httpov.prepare_job(path, {"frames": "8-12"})

    def test_prepare_job_frames_on_still(self):
        path = self.archive({"still.pov": SPHERE_SCENE})
        with self.assertRaisesRegex(httpov.UserError, "not an animation"):
            httpov.prepare_job(path, {"frames": "1-2"})

    def test_prepare_job_options_make_animation(self):
        path = self.archive({"still.pov": SPHERE_SCENE})
        plan = httpov.prepare_job(path, {
            "povray_options": ["+KFF4", "+W64", "+H48"], "slices": "2"})
        self.assertEqual((plan["first_frame"], plan["last_frame"]), (1, 4))
        self.assertEqual(plan["row_ranges"], [(1, 32), (33, 48)])
        self.assertEqual(plan["task_count"], 8)

    def test_prepare_job_include_header(self):
        path = self.archive({"s.pov": SPHERE_SCENE, "head.inc": b"//"})
        plan = httpov.prepare_job(path, {"povray_options": ["+HIhead.inc"]})
        self.assertEqual(plan["povray_options"], ["+HIhead.inc"])
        for header in ("/etc/passwd", "../x.inc", "missing.inc"):
            with self.subTest(header=header):
                with self.assertRaises(httpov.UserError):
                    httpov.prepare_job(path, {"povray_options":
                                              ["+HI" + header]})

    def test_prepare_job_stream_file_in_ini(self):
        path = self.archive({"j.ini": b"Input_File_Name=s.pov\n"
                                      b"Fatal_File=/tmp/owned.txt\n",
                             "s.pov": SPHERE_SCENE})
        with self.assertRaisesRegex(httpov.UserError, "owned.txt"):
            httpov.prepare_job(path, {})

    def test_prepare_job_missing_scene(self):
        path = self.archive({"job.ini": b"Input_File_Name=gone.pov\n",
                             "other.txt": b"x"})
        with self.assertRaisesRegex(httpov.UserError, "gone.pov"):
            httpov.prepare_job(path, {})

    def test_prepare_job_slices_and_rows_conflict(self):
        path = self.archive({"still.pov": SPHERE_SCENE})
        with self.assertRaisesRegex(httpov.UserError, "not both"):
            httpov.prepare_job(path, {"slices": "2",
                                      "rows_per_slice": "64"})

    def test_frame_file_names(self):
        settings = {"animated": True, "final_frame": 120, "cyclic": False}
        self.assertEqual(httpov.frame_file_name("My scene", 7, settings),
                         "My_scene_007.png")
        self.assertEqual(httpov.frame_file_name(
            "a", 1, {"animated": False}), "a.png")


# ---------------------------------------------------------------------------
# 4. Images
# ---------------------------------------------------------------------------

def filter_scanlines(rows, pixel_bytes, filter_types):
    """Filter raw rows with the given PNG filter types (test encoder)."""
    prior = bytes(len(rows[0]))
    result = []
    for row, filter_type in zip(rows, filter_types):
        out = bytearray(len(row))
        for i, value in enumerate(row):
            left = row[i - pixel_bytes] if i >= pixel_bytes else 0
            above = prior[i]
            corner = prior[i - pixel_bytes] if i >= pixel_bytes else 0
            if filter_type == 0:
                predictor = 0
            elif filter_type == 1:
                predictor = left
            elif filter_type == 2:
                predictor = above
            elif filter_type == 3:
                predictor = (left + above) >> 1
            else:
                estimate = left + above - corner
                distances = (abs(estimate - left), abs(estimate - above),
                             abs(estimate - corner))
                predictor = (left, above, corner)[distances.index(
                    min(distances))]
            out[i] = (value - predictor) & 255
        result.append((filter_type, bytes(out)))
        prior = row
    return result


def random_rows(width, height, pixel_bytes, seed=1):
    generator = __import__("random").Random(seed)
    return [bytes(generator.randrange(256) for _ in range(width *
                                                           pixel_bytes))
            for _ in range(height)]


class PngTest(unittest.TestCase):

    def setUp(self):
        self.folder = make_temp_dir()
        self.addCleanup(shutil.rmtree, self.folder)

    def write(self, name, info, rows, filter_types=None):
        path = os.path.join(self.folder, name)
        types = filter_types or [row % 5 for row in range(len(rows))]
        httpov.write_png(path, info, filter_scanlines(
            rows, info.pixel_bytes, types))
        return path

    def decode(self, path):
        rows = httpov.iter_png_rows(path)
        info, _ = next(rows)
        return info, list(rows)

    def test_round_trip_every_filter(self):
        for color_type, depth in ((2, 8), (6, 8), (2, 16), (6, 16),
                                  (0, 8), (4, 16)):
            with self.subTest(color_type=color_type, depth=depth):
                info = httpov.ImageInfo(13, 11, depth, color_type)
                rows = random_rows(13, 11, info.pixel_bytes)
                path = self.write("round.png", info, rows)
                decoded_info, decoded = self.decode(path)
                self.assertEqual(decoded_info, info)
                self.assertEqual(decoded, rows)

    @needs_pillow
    def test_decoder_matches_pillow(self):
        info = httpov.ImageInfo(17, 10, 8, 6)
        rows = random_rows(17, 10, 4, seed=7)
        path = self.write("pillow.png", info, rows)
        image = Image.open(path)
        self.assertEqual(image.mode, "RGBA")
        self.assertEqual(image.tobytes(), b"".join(self.decode(path)[1]))

    @needs_pillow
    def test_decoder_reads_pillow_png(self):
        image = Image.frombytes("RGB", (31, 9), bytes(
            (i * 7) % 256 for i in range(31 * 9 * 3)))
        path = os.path.join(self.folder, "from-pillow.png")
        image.save(path, optimize=True)
        self.assertEqual(b"".join(self.decode(path)[1]), image.tobytes())

    def test_crop_keeps_exact_rows(self):
        info = httpov.ImageInfo(9, 20, 8, 2)
        rows = random_rows(9, 20, 3, seed=3)
        path = self.write("full.png", info, rows)
        target = os.path.join(self.folder, "crop.png")
        cropped = httpov.crop_png(path, target, 5, 12)
        self.assertEqual(cropped.height, 8)
        self.assertEqual(self.decode(target)[1], rows[4:12])

    def test_stitch_equals_whole_image(self):
        for depth, color_type in ((8, 2), (16, 6)):
            with self.subTest(depth=depth, color_type=color_type):
                info = httpov.ImageInfo(7, 23, depth, color_type)
                rows = random_rows(7, 23, info.pixel_bytes, seed=depth)
                parts = []
                for number, (first, last) in enumerate(
                        ((0, 8), (8, 16), (16, 23))):
                    part = info._replace(height=last - first)
                    # Slices start with Average, Paeth and Up rows, which
                    # refer to the row above and must be re-filtered.
                    types = [(3, 4, 2)[number]] + [
                        row % 5 for row in range(last - first - 1)]
                    parts.append(self.write("part%d.png" % number, part,
                                            rows[first:last], types))
                target = os.path.join(self.folder, "stitched.png")
                httpov.stitch_pngs(target, parts, 7, 23)
                decoded_info, decoded = self.decode(target)
                self.assertEqual(decoded_info, info)
                self.assertEqual(decoded, rows)

    @needs_pillow
    def test_animated_png_matches_frames(self):
        info = httpov.ImageInfo(12, 9, 8, 6)
        frames = [random_rows(12, 9, 4, seed=seed) for seed in (1, 2, 3)]
        paths = [self.write("f%d.png" % index, info, rows)
                 for index, rows in enumerate(frames)]
        target = os.path.join(self.folder, "anim.png")
        httpov.write_apng(target, paths, delay_ms=100)
        with Image.open(target) as image:
            self.assertEqual(getattr(image, "n_frames", 1), 3)
            for index, rows in enumerate(frames):
                image.seek(index)
                self.assertEqual(image.convert("RGBA").tobytes(),
                                 b"".join(rows), "frame %d" % index)
            self.assertEqual(image.info.get("duration"), 100)

    @needs_tool("ffmpeg")
    def test_mp4_pads_odd_sizes(self):
        info = httpov.ImageInfo(33, 21, 8, 2)
        paths = [self.write("f%d.png" % seed, info,
                            random_rows(33, 21, 3, seed=seed))
                 for seed in range(5)]
        target = os.path.join(self.folder, "video.mp4")
        folder = os.path.join(self.folder, "numbered")
        os.mkdir(folder)
        httpov.encode_mp4(shutil.which("ffmpeg"), paths, target, folder)
        self.assertEqual(probe_video(target), ("h264", 34, 22, 5))

    @needs_tool("ffmpeg")
    def test_mp4_failure_names_ffmpeg_error(self):
        broken = os.path.join(self.folder, "broken.png")
        with open(broken, "wb") as out:
            out.write(b"not a picture")
        folder = os.path.join(self.folder, "numbered")
        os.mkdir(folder)
        with self.assertRaisesRegex(httpov.HelperFailed,
                                    "ffmpeg failed with exit code"):
            httpov.encode_mp4(shutil.which("ffmpeg"), [broken],
                              os.path.join(self.folder, "v.mp4"), folder)

    def test_animated_png_rejects_mixed_sizes(self):
        small = self.write("s.png", httpov.ImageInfo(4, 4, 8, 2),
                           random_rows(4, 4, 3))
        large = self.write("l.png", httpov.ImageInfo(5, 4, 8, 2),
                           random_rows(5, 4, 3))
        with self.assertRaisesRegex(httpov.ImageError, "the first is"):
            httpov.write_apng(os.path.join(self.folder, "a.png"),
                              [small, large])

    def test_stitch_rejects_wrong_total(self):
        info = httpov.ImageInfo(4, 4, 8, 2)
        path = self.write("a.png", info, random_rows(4, 4, 3))
        with self.assertRaisesRegex(httpov.ImageError, "8 rows"):
            httpov.stitch_pngs(os.path.join(self.folder, "out.png"),
                               [path, path], 4, 9)

    def test_truncated_png_rejected(self):
        info = httpov.ImageInfo(20, 20, 8, 2)
        path = self.write("t.png", info, random_rows(20, 20, 3))
        with open(path, "rb") as source:
            data = source.read()
        for cut in (10, 40, len(data) - 30):
            with self.subTest(cut=cut):
                with open(path, "wb") as out:
                    out.write(data[:cut])
                with self.assertRaises(httpov.ImageError):
                    httpov.check_png(path)

    def test_bad_crc_rejected(self):
        info = httpov.ImageInfo(5, 5, 8, 2)
        path = self.write("crc.png", info, random_rows(5, 5, 3))
        with open(path, "r+b") as out:
            out.seek(20)
            out.write(b"\xff")
        with self.assertRaisesRegex(httpov.ImageError, "CRC"):
            httpov.check_png(path)

    def test_wrong_size_rejected(self):
        info = httpov.ImageInfo(5, 6, 8, 2)
        path = self.write("size.png", info, random_rows(5, 6, 3))
        with self.assertRaisesRegex(httpov.ImageError, "expected 5x7"):
            httpov.check_png(path, 5, 7)

    def test_too_many_rows_rejected(self):
        path = os.path.join(self.folder, "extra.png")
        raw = b"".join(b"\0" + bytes(6) for _ in range(3))
        with open(path, "wb") as out:
            out.write(httpov.PNG_SIGNATURE)
            out.write(httpov.png_chunk(b"IHDR", struct.pack(
                ">IIBBBBB", 2, 2, 8, 2, 0, 0, 0)))
            out.write(httpov.png_chunk(b"IDAT", zlib.compress(raw)))
            out.write(httpov.png_chunk(b"IEND", b""))
        with self.assertRaisesRegex(httpov.ImageError, "more rows"):
            httpov.check_png(path)

    @needs_pillow
    def test_ppm_with_comments_matches_pillow(self):
        rows = random_rows(6, 5, 3, seed=9)
        path = os.path.join(self.folder, "in.ppm")
        with open(path, "wb") as out:
            out.write(b"P6\n# made by a test\n6 5\n# another\n255\n")
            out.write(b"".join(rows))
        target = os.path.join(self.folder, "out.png")
        httpov.ppm_to_png(path, target, 2, 4)
        self.assertEqual(self.decode(target)[1], rows[1:4])
        image = Image.open(path)
        self.assertEqual(image.tobytes(), b"".join(rows))

    def test_check_png_format(self):
        path = self.write("rgb16.png", httpov.ImageInfo(4, 3, 16, 2),
                          random_rows(4, 3, 6))
        httpov.check_png(path, 4, 3, 16, False)
        with self.assertRaisesRegex(httpov.ImageError, "expected 8 bits"):
            httpov.check_png(path, 4, 3, 8, False)
        with self.assertRaisesRegex(httpov.ImageError, "expected an alpha"):
            httpov.check_png(path, 4, 3, 16, True)

    def test_ppm_header_length_limited(self):
        path = os.path.join(self.folder, "long.ppm")
        with open(path, "wb") as out:
            out.write(b"P6\n#" + b"x" * 100000 + b"\n4 3\n255\n")
        started = time.time()
        with self.assertRaisesRegex(httpov.ImageError, "longer than"):
            httpov.ppm_to_png(path, os.path.join(self.folder, "l.png"))
        self.assertLess(time.time() - started, 1)

    def test_pgm_becomes_grey_png(self):
        path = os.path.join(self.folder, "grey.pgm")
        pixels = bytes(range(12))
        with open(path, "wb") as out:
            out.write(b"P5\n4 3\n255\n" + pixels)
        target = os.path.join(self.folder, "grey.png")
        info = httpov.ppm_to_png(path, target, 2, 3)
        self.assertEqual(info.describe(), "4x2 grey 8-bit")
        self.assertEqual(decode_rows(target)[1], pixels[4:])

    def test_ppm_16_bit(self):
        rows = random_rows(3, 2, 6, seed=4)
        path = os.path.join(self.folder, "deep.ppm")
        with open(path, "wb") as out:
            out.write(b"P6 3 2 65535\n" + b"".join(rows))
        target = os.path.join(self.folder, "deep.png")
        info = httpov.ppm_to_png(path, target)
        self.assertEqual(info.depth, 16)
        self.assertEqual(self.decode(target)[1], rows)

    def test_ppm_truncated(self):
        path = os.path.join(self.folder, "short.ppm")
        with open(path, "wb") as out:
            out.write(b"P6 4 4 255\n" + bytes(20))
        with self.assertRaisesRegex(httpov.ImageError, "truncated"):
            httpov.ppm_to_png(path, os.path.join(self.folder, "x.png"))


@needs_povray
class PovrayImageTest(unittest.TestCase):
    """POV-Ray's own PNGs use all five filters; its PPMs are the oracle."""

    def setUp(self):
        self.assertTrue(POVRAY, "POV-Ray is required (HTTPOV_CI=1)")
        self.folder = make_temp_dir()
        self.addCleanup(shutil.rmtree, self.folder)
        with open(os.path.join(self.folder, "s.pov"), "wb") as out:
            out.write(SPHERE_SCENE)

    def render(self, *options):
        subprocess.run([POVRAY, "-D", "+Is.pov", "+W97", "+H61", "+A0.3",
                        "+WT1"] + list(options), cwd=self.folder,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       check=True)

    def test_png_pixels_equal_ppm(self):
        for depth in (8, 16):
            with self.subTest(depth=depth):
                self.render("+FN%d" % depth, "+Oimage.png")
                self.render("+FP%d" % depth, "+Oimage.ppm")
                rows = httpov.iter_png_rows(
                    os.path.join(self.folder, "image.png"))
                info, _ = next(rows)
                self.assertEqual(info.depth, depth)
                with open(os.path.join(self.folder, "image.ppm"),
                          "rb") as source:
                    ppm_info = httpov.read_ppm_header(source)
                    pixels = source.read()
                self.assertEqual(ppm_info.depth, depth)
                self.assertEqual(b"".join(rows), pixels)

    @needs_pillow
    def test_alpha_png_matches_pillow(self):
        self.render("+FN8", "+UA", "+Oalpha.png")
        path = os.path.join(self.folder, "alpha.png")
        rows = httpov.iter_png_rows(path)
        info, _ = next(rows)
        self.assertEqual(info.color_type, 6)
        self.assertEqual(b"".join(rows), Image.open(path).tobytes())


# ---------------------------------------------------------------------------
# 5. Storage
# ---------------------------------------------------------------------------

class StorageTest(unittest.TestCase):

    def setUp(self):
        self.folder = make_temp_dir()
        self.addCleanup(shutil.rmtree, self.folder)
        self.db = httpov.Database(os.path.join(self.folder, "t.sqlite3"))
        path = make_zip(os.path.join(self.folder, "j.zip"), {
            "a.ini": b"Input_File_Name=a.pov\nFinal_Frame=6\n",
            "a.pov": SPHERE_SCENE})
        self.plan = httpov.prepare_job(path, {})
        self.job_id = self.db.create_job(self.plan, "0" * 64, 2, 100.0)
        self.worker = self.db.register_worker("w", "", "h", 100.0)

    def test_claim_leases_each_task_once(self):
        seen = set()
        for _ in range(6):
            task, _ = self.db.claim_task(self.worker, 100.0, 60)
            self.assertNotIn(task["id"], seen)
            seen.add(task["id"])
        self.assertIsNone(self.db.claim_task(self.worker, 100.0, 60))

    def test_expired_lease_requeues(self):
        task, _ = self.db.claim_task(self.worker, 100.0, 10)
        self.assertEqual(self.db.expire_leases(105.0), [])
        expired = self.db.expire_leases(111.0)
        self.assertEqual(expired, [(task["id"], self.job_id, self.worker)])
        self.assertEqual(self.db.task(task["id"])["state"], "queued")

    def test_stale_attempt_is_conflict(self):
        task, _ = self.db.claim_task(self.worker, 100.0, 10)
        self.db.expire_leases(200.0)
        other = self.db.register_worker("w2", "", "h", 200.0)
        again, _ = self.db.claim_task(other, 201.0, 10)
        self.assertEqual(again["id"], task["id"])
        with self.assertRaises(httpov.Conflict):
            self.db.heartbeat(task["id"], task["attempt"], self.worker,
                              0.5, 201.0, 10)

    def test_expired_attempt_taken_back(self):
        task, _ = self.db.claim_task(self.worker, 100.0, 10)
        self.db.expire_leases(200.0)
        action = self.db.heartbeat(task["id"], task["attempt"],
                                   self.worker, 0.5, 201.0, 10)
        self.assertEqual(action, "continue")
        stored = self.db.task(task["id"])
        self.assertEqual(stored["state"], "leased")
        self.assertEqual(stored["worker_id"], self.worker)

    def test_failed_task_avoids_its_worker(self):
        task, _ = self.db.claim_task(self.worker, 100.0, 10)
        self.assertFalse(self.db.fail_task(task["id"], task["attempt"],
                                           "boom", "", 101.0))
        again, _ = self.db.claim_task(self.worker, 102.0, 10)
        self.assertNotEqual(again["id"], task["id"])
        other = self.db.register_worker("w2", "", "h", 101.0)
        retry, _ = self.db.claim_task(other, 102.0, 10)
        self.assertEqual(retry["id"], task["id"])

    def test_attempt_limit_fails_job(self):
        other = self.db.register_worker("w2", "", "h", 100.0)
        for attempt, worker in ((1, self.worker), (2, other)):
            task, _ = self.db.claim_task(worker, 100.0 + attempt, 10)
            self.assertEqual(task["attempts"], attempt)
            failed = self.db.fail_task(task["id"], task["attempt"],
                                       "boom %d" % attempt, "", 101.0)
            self.assertEqual(failed, attempt == 2)
        job = self.db.job(self.job_id)
        self.assertEqual(job["state"], "failed")
        self.assertIn("boom 2", job["error"])
        self.assertIn("task %d" % task["id"], job["error"])
        self.assertIsNone(self.db.claim_task(self.worker, 110.0, 10))

    def test_paused_job_not_claimed(self):
        self.db.control_job(self.job_id, "pause", 100.0)
        self.assertIsNone(self.db.claim_task(self.worker, 100.0, 10))
        self.db.control_job(self.job_id, "resume", 100.0)
        self.assertIsNotNone(self.db.claim_task(self.worker, 100.0, 10))

    def test_adaptive_tasks_grow_to_target(self):
        plan = dict(self.plan, last_frame=200, task_count=200)
        job_id = self.db.create_job(plan, "3" * 64, 2, 100.0)
        self.db.control_job(self.job_id, "cancel", 100.0)
        task, _ = self.db.claim_task(self.worker, 100.0, 60)
        self.assertEqual(task["frame_first"], task["frame_last"])
        self.db.accept_result(task["id"], task["attempt"], "", 101.0,
                              lambda: None)
        task, _ = self.db.claim_task(self.worker, 101.0, 60)
        frames = task["frame_last"] - task["frame_first"] + 1
        self.assertEqual(frames, 30, "one second a frame, 30 s target")
        job = self.db.job(job_id)
        self.assertEqual(job["task_count"], 200 - 29)

    def test_adaptive_slices_grow_to_target(self):
        plan = dict(self.plan, last_frame=20, sliced=True,
                    row_ranges=[(first, first + 31)
                                for first in range(1, 320, 32)],
                    task_count=200)
        plan["settings"] = dict(plan["settings"], height=320)
        self.db.control_job(self.job_id, "cancel", 100.0)
        job_id = self.db.create_job(plan, "5" * 64, 2, 100.0)
        task, _ = self.db.claim_task(self.worker, 100.0, 60)
        self.assertEqual((task["row_first"], task["row_last"]), (1, 32))
        self.db.accept_result(task["id"], task["attempt"], "", 101.0,
                              lambda: None)
        task, _ = self.db.claim_task(self.worker, 101.0, 60)
        self.assertEqual((task["row_first"], task["row_last"]), (33, 320),
                         "one second per 32 rows: the rest of the frame")
        self.assertEqual(self.db.job(job_id)["task_count"], 200 - 8)

    def test_fixed_frames_per_task_not_merged(self):
        plan = dict(self.plan, last_frame=100, task_count=50,
                    frames_per_task=2)
        self.db.control_job(self.job_id, "cancel", 100.0)
        self.db.create_job(plan, "4" * 64, 2, 100.0)
        task, _ = self.db.claim_task(self.worker, 100.0, 60)
        self.db.accept_result(task["id"], task["attempt"], "", 101.0,
                              lambda: None)
        task, _ = self.db.claim_task(self.worker, 101.0, 60)
        self.assertEqual(task["frame_last"] - task["frame_first"], 1)

    def test_priority_and_max_workers(self):
        plan = dict(self.plan, priority=5, max_workers=1)
        urgent = self.db.create_job(plan, "1" * 64, 2, 100.0)
        task, job = self.db.claim_task(self.worker, 100.0, 10)
        self.assertEqual(job["id"], urgent)
        other = self.db.register_worker("w2", "", "h", 100.0)
        task, job = self.db.claim_task(other, 100.0, 10)
        self.assertEqual(job["id"], self.job_id,
                         "max_workers=1 sends the second worker elsewhere")

    def test_concurrent_claims_never_share_a_task(self):
        plan = dict(self.plan, last_frame=200)
        plan["task_count"] = 200
        self.db.create_job(plan, "2" * 64, 2, 100.0)
        claimed = []
        lock = threading.Lock()

        def claim_all():
            worker = self.db.register_worker("c", "", "h", 100.0)
            while True:
                result = self.db.claim_task(worker, 100.0, 60)
                if result is None:
                    return
                with lock:
                    claimed.append(result[0]["id"])

        threads = [threading.Thread(target=claim_all) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.assertEqual(len(claimed), len(set(claimed)))
        self.assertEqual(len(claimed), 6 + 200)


# ---------------------------------------------------------------------------
# 8. Worker: POV-Ray command lines and errors
# ---------------------------------------------------------------------------

def sample_task(**changes):
    task = {
        "id": 1, "job_id": 1, "job_name": "demo", "attempt": "a" * 32,
        "ini": "demo.ini", "povray_options": ["+A0.3"], "sliced": True,
        "settings": {"input_file": "demo.pov", "depth": 8, "height": 100,
                     "width": 120,
                     "animated": True, "initial_frame": 1,
                     "final_frame": 10},
        "frame_first": 3, "frame_last": 3, "row_first": 1, "row_last": 32,
    }
    task.update(changes)
    return task


class CommandLineTest(unittest.TestCase):

    def test_order_ini_options_farm(self):
        command = httpov.povray_command("povray", sample_task(), 2,
                                        "/out/frame", "fatal.txt")
        self.assertEqual(command[:3], ["povray", "demo.ini", "+A0.3"])
        for option in ("+W120", "+H100", "+Idemo.pov", "+O/out/frame",
                       "+FN8", "-D",
                       "+WT2", "+SF3", "+EF3", "+ER32"):
            self.assertIn(option, command)

    def test_first_row_is_left_out(self):
        command = httpov.povray_command("povray", sample_task(), 1,
                                        "o", "f")
        self.assertFalse([part for part in command
                          if part.startswith("+SR")])

    def test_last_row_is_left_out(self):
        command = httpov.povray_command(
            "povray", sample_task(row_first=97, row_last=100), 1, "o", "f")
        self.assertIn("+SR97", command)
        self.assertFalse([part for part in command
                          if part.startswith("+ER")])

    def test_bad_ranges_rejected(self):
        for changes in ({"row_first": 50, "row_last": 40},
                        {"row_first": 1, "row_last": 1},
                        {"row_first": 90, "row_last": 101},
                        {"frame_first": 9, "frame_last": 11}):
            with self.subTest(changes=changes):
                with self.assertRaises(httpov.TaskFailed):
                    httpov.povray_command("povray", sample_task(**changes),
                                          1, "o", "f")

    def test_error_from_parse_error_output(self):
        output = ("File 'a.pov' line 1: Possible Parse Error: x\n"
                  "File 'a.pov' line 1: Parse Error: Cannot open include "
                  "file b.inc.\nFatal error in parser\nRender failed\n")
        self.assertEqual(httpov.povray_error(output),
                         "File 'a.pov' line 1: Parse Error: Cannot open "
                         "include file b.inc.")

    def test_error_from_option_failure(self):
        output = "Stream output files must be elsewhere.\nRender failed\n"
        self.assertEqual(httpov.povray_error(output),
                         "Stream output files must be elsewhere. "
                         "Render failed")

    def test_worker_runs_without_sqlite3(self):
        # Some minimal Pythons lack sqlite3; only serve may need it.
        code = ("import sys; sys.modules['sqlite3'] = None; import httpov; "
                "args = httpov.build_parser().parse_args(['work', "
                "'http://127.0.0.1:9/']); print('sqlite3' in [name for "
                "name, module in sys.modules.items() if module])")
        result = subprocess.run([sys.executable, "-c", code],
                                stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE,
                                universal_newlines=True, cwd=HERE)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.strip(), "False")

    def test_windows_povray_is_recognised(self):
        for name in ("pvengine.exe", "PVENGINE64.EXE", "pvengine64",
                     "C:\\Program Files\\POV-Ray\\v3.7\\bin\\"
                     "pvengine64.exe", "/cygdrive/c/POV-Ray/pvengine.exe"):
            self.assertTrue(httpov.is_windows_povray(name), name)
        for name in ("povray", "/usr/bin/povray", "C:\\bin\\povray.exe",
                     "pvengine-wrapper"):
            self.assertFalse(httpov.is_windows_povray(name), name)

    def test_windows_command_line(self):
        engine = ("C:\\Program Files\\POV-Ray\\v3.7\\bin\\"
                  "pvengine64.exe")
        command = httpov.povray_command(engine, sample_task(), 2,
                                        "..\\output\\frame", "fatal.txt")
        self.assertEqual(command[:6], [engine, "/NR", "/EXIT", "/RENDER",
                                       "demo.ini", "+A0.3"])
        for option in ("+O..\\output\\frame", "+GApovray-output.txt",
                       "+GFfatal.txt", "+Idemo.pov", "-D", "+SF3"):
            self.assertIn(option, command)
        self.assertTrue(subprocess.list2cmdline(command).startswith(
            '"C:\\Program Files\\POV-Ray\\v3.7\\bin\\pvengine64.exe" '
            '/NR /EXIT /RENDER demo.ini'))
        still = httpov.povray_command(engine, sample_task(ini=None), 1,
                                      "o", "f")
        self.assertEqual(still[4], "demo.pov")

    def test_windows_output_base_is_relative(self):
        task_dir = "C:\\Users\\Jo Doe\\httpov work\\task 7"
        self.assertEqual(httpov.windows_output_base(
            task_dir + "\\output\\frame", task_dir + "\\scene", ntpath),
            "..\\output\\frame")
        self.assertEqual(httpov.windows_output_base(
            "D:\\out\\frame", "C:\\scene", ntpath), "D:\\out\\frame")

    def test_job_without_action_is_usage_error(self):
        result = run_cli("job", "http://127.0.0.1:9/", "6")
        self.assertEqual(result.returncode, 2)
        self.assertIn("nothing to do", result.stderr)

    def test_exit_by_signal_is_named(self):
        self.assertIn("SIGKILL", httpov.describe_exit(-9))
        self.assertIn("SIGKILL", httpov.describe_exit(137, True))
        self.assertIn("cancelled", httpov.describe_exit(2))


# ---------------------------------------------------------------------------
# 6.-9. Server, client, worker and CLI, end to end on loopback
# ---------------------------------------------------------------------------

def read_until_closed(connection):
    """Return what the server sends until it closes the connection, as
    text. Headers and body may arrive in separate packets."""
    received = []
    for chunk in iter(lambda: connection.recv(4096), b""):
        received.append(chunk)
    return b"".join(received).decode("latin-1")


def run_cli(*arguments, env=None, timeout=300):
    """Run ``httpov.py`` with arguments; return the CompletedProcess."""
    return subprocess.run(
        [sys.executable, os.path.join(HERE, "httpov.py")] +
        [str(argument) for argument in arguments],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout,
        universal_newlines=True, env=env)


class ServerProcess:
    """A real ``httpov.py serve`` on a free loopback port."""

    def __init__(self, data_dir, lease=10, extra=(), port=0,
                 scheme="http", env=None):
        self.data_dir = data_dir
        self.log_path = os.path.join(os.path.dirname(data_dir),
                                     "server.log")
        with open(self.log_path, "a") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, os.path.join(HERE, "httpov.py"), "serve",
                 "--bind", "127.0.0.1", "--port", str(port), "--data",
                 data_dir,
                 "--lease", str(lease)] + list(extra),
                stdout=subprocess.PIPE, stderr=log_file,
                universal_newlines=True, env=env)
        first_line = self.process.stdout.readline()
        match = re.search(r"port (\d+)", first_line)
        if not match:
            self.process.kill()
            self.process.wait()
            raise RuntimeError("serve did not start on port %d: %r (see %s)"
                               % (port, first_line, self.log_path))
        self.port = int(match.group(1))
        self.url = "%s://127.0.0.1:%d/" % (scheme, self.port)
        with open(os.path.join(data_dir, "tokens.json")) as source:
            tokens = json.load(source)
        self.admin = tokens["admin"]
        self.worker = tokens["worker"]
        threading.Thread(target=self.process.stdout.read,
                         daemon=True).start()

    def client(self):
        return httpov.ApiClient(self.url, self.admin)

    def kill(self):
        """Stop the server with SIGKILL, as a crash would."""
        self.process.kill()
        self.process.wait()

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stdout.close()


def start_worker(server, folder, name):
    with open(os.path.join(folder, name + ".log"), "a") as log_file:
        return subprocess.Popen(
            [sys.executable, os.path.join(HERE, "httpov.py"), "work",
             server.url, "--token", server.worker, "--name", name,
             "--threads", "1", "--workdir", os.path.join(folder, name)],
            stdout=log_file, stderr=log_file)


def wait_for_job(client, job_id, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.call("GET", "/api/jobs/%d" % job_id)
        if job["state"] in httpov.FINAL_JOB_STATES:
            return job
        time.sleep(0.5)
    raise AssertionError("job %d did not finish in %d s" % (job_id,
                                                            timeout))


def decode_rows(path):
    rows = httpov.iter_png_rows(path)
    info, _ = next(rows)
    return info, b"".join(rows)


def probe_video(path):
    """Return (codec, width, height, frame count) of a video file."""
    result = subprocess.run(
        ["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0",
         "-show_entries", "stream=codec_name,width,height,nb_read_frames",
         "-of", "json", path], stdout=subprocess.PIPE, check=True)
    stream = json.loads(result.stdout.decode())["streams"][0]
    return (stream["codec_name"], stream["width"], stream["height"],
            int(stream["nb_read_frames"]))


def render_plain(scene_dir, target, *options):
    """Render with POV-Ray directly, as one machine would."""
    ini = [name for name in os.listdir(scene_dir) if name.endswith(".ini")]
    subprocess.run([POVRAY, "-D", "+WT2"] + ini + list(options) +
                   ["+FN8", "+O" + target], cwd=scene_dir,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   check=True)


@needs_povray
class EndToEndTest(unittest.TestCase):
    """A real server subprocess, two real workers and real POV-Ray."""

    @classmethod
    def setUpClass(cls):
        if not POVRAY:
            raise AssertionError("POV-Ray is required (HTTPOV_CI=1)")
        cls.folder = make_temp_dir(prefix="httpov-e2e-")
        cls.server = ServerProcess(os.path.join(cls.folder, "data"))
        cls.workers = [start_worker(cls.server, cls.folder, "w%d" % n)
                       for n in (1, 2)]
        cls.client = cls.server.client()

    @classmethod
    def tearDownClass(cls):
        for worker in cls.workers:
            worker.send_signal(signal.SIGTERM)
        for worker in cls.workers:
            try:
                worker.wait(15)
            except subprocess.TimeoutExpired:
                worker.kill()
        cls.client.close()
        cls.server.stop()
        shutil.rmtree(cls.folder, ignore_errors=True)

    def submit(self, path, *options):
        result = run_cli("submit", self.server.url, path, "--token",
                         self.server.admin, *options)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertRegex(result.stdout, r"^\d+\n$",
                         "submit prints the job id alone")
        return int(result.stdout)

    def fetch(self, job_id, output):
        return run_cli("fetch", self.server.url, job_id, "--token",
                       self.server.admin, "-o", output, "--wait")

    def test_animation_example(self):
        source = os.path.join(EXAMPLES, "animation")
        job_id = self.submit(source, "--frames", "3-8")
        output = os.path.join(self.folder, "animation-out")
        result = self.fetch(job_id, output)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        names = sorted(os.listdir(output))
        self.assertEqual(names, ["animation_%02d.png" % frame
                                 for frame in range(3, 9)])
        reference = os.path.join(self.folder, "anim-ref")
        os.makedirs(reference)
        render_plain(source, os.path.join(reference, "f"), "+SF5", "+EF5")
        _, expected = decode_rows(os.path.join(reference, "f05.png"))
        info, actual = decode_rows(os.path.join(output, "animation_05.png"))
        self.assertEqual((info.width, info.height), (320, 240))
        self.assertEqual(actual, expected,
                         "frame 5 differs from a one-machine render")

        archive = os.path.join(self.folder, "all.zip")
        self.client.download("/api/jobs/%d/frames.zip" % job_id, archive)
        with zipfile.ZipFile(archive) as frames:
            self.assertEqual(sorted(frames.namelist()), names)
        animation = os.path.join(self.folder, "animation.png")
        self.client.download("/api/jobs/%d/animation.png" % job_id,
                             animation)
        with open(animation, "rb") as source:
            data = source.read()
        self.assertEqual(data.count(b"fcTL"), 6)
        self.assertIn(b"acTL", data)

    @needs_tool("ffmpeg")
    def test_client_reconnects_after_idle(self):
        client = self.server.client()
        self.addCleanup(client.close)
        client.call("GET", "/api/jobs")
        first = client.connection
        client.call("GET", "/api/jobs")
        self.assertIs(client.connection, first, "keep-alive is used")
        client.last_used -= httpov.CLIENT_IDLE_SECONDS + 1
        client.call("GET", "/api/jobs")
        self.assertIsNot(client.connection, first,
                         "a connection the server may have closed is "
                         "not reused")

    def test_mp4_of_animation(self):
        job_id = self.submit(os.path.join(EXAMPLES, "animation"),
                             "--frames", "1-4")
        job = wait_for_job(self.client, job_id)
        self.assertEqual(job["state"], "done", job["error"])
        target = os.path.join(self.folder, "animation.mp4")
        self.client.download("/api/jobs/%d/animation.mp4" % job_id, target)
        self.assertEqual(probe_video(target), ("h264", 320, 240, 4))

    @needs_pillow
    def test_sliced_still_matches_full_render(self):
        source = os.path.join(EXAMPLES, "sliced-still")
        job_id = self.submit(source, "--slices", "4")
        job = wait_for_job(self.client, job_id)
        self.assertEqual(job["state"], "done", job["error"])
        self.assertEqual(job["tasks"], 4)
        output = os.path.join(self.folder, "still-out")
        result = self.fetch(job_id, output)
        self.assertEqual(result.returncode, 0, result.stderr)
        stitched = os.path.join(output, "sliced-still.png")
        reference = os.path.join(self.folder, "still-ref.png")
        render_plain(source, reference)
        info, actual = decode_rows(stitched)
        _, expected = decode_rows(reference)
        self.assertEqual((info.width, info.height), (800, 600))
        self.assertEqual(actual, expected,
                         "stitched antialiased still differs from a full "
                         "render")
        self.assertEqual(Image.open(stitched).tobytes(),
                         Image.open(reference).tobytes())

    def test_sliced_animation_example(self):
        source = os.path.join(EXAMPLES, "sliced-animation")
        job_id = self.submit(source, "--slices", "3", "--frames", "2-4")
        job = wait_for_job(self.client, job_id)
        self.assertEqual(job["state"], "done", job["error"])
        self.assertEqual(job["frames_done"], 3)
        self.assertEqual(job["slices_per_frame"], 3)
        output = os.path.join(self.folder, "sliced-anim-out")
        self.assertEqual(self.fetch(job_id, output).returncode, 0)
        reference = os.path.join(self.folder, "sanim-ref")
        os.makedirs(reference)
        render_plain(source, os.path.join(reference, "f"), "+SF3", "+EF3")
        _, expected = decode_rows(os.path.join(reference, "f03.png"))
        _, actual = decode_rows(os.path.join(output,
                                             "sliced-animation_03.png"))
        self.assertEqual(actual, expected)

    def test_httpov_zip_layout(self):
        path = os.path.join(self.folder, "legacy.zip")
        make_zip(path, {
            "legacy/pov.ini": b"Input_File_Name=legacy.pov\nWidth=64\n"
                              b"Height=48\nInitial_Frame=0\n"
                              b"Final_Frame=2\n",
            "legacy/legacy.pov": SPHERE_SCENE})
        job_id = self.submit(path)
        job = wait_for_job(self.client, job_id)
        self.assertEqual(job["state"], "done", job["error"])
        self.assertEqual(job["name"], "legacy")
        self.assertEqual(job["frames_done"], 3)

    def test_alpha_and_16_bit_are_kept(self):
        folder = os.path.join(self.folder, "deep")
        os.makedirs(folder)
        with open(os.path.join(folder, "deep.pov"), "wb") as out:
            out.write(SPHERE_SCENE.replace(b"plane", b"// plane"))
        job_id = self.submit(folder, "--rows-per-slice", "32", "--",
                             "+W80", "+H70", "+FN16", "+UA")
        job = wait_for_job(self.client, job_id)
        self.assertEqual(job["state"], "done", job["error"])
        output = os.path.join(self.folder, "deep-out")
        self.assertEqual(self.fetch(job_id, output).returncode, 0)
        info, actual = decode_rows(os.path.join(output, "deep.png"))
        self.assertEqual((info.depth, info.color_type), (16, 6))
        subprocess.run([POVRAY, "-D", "+WT2", "+Ideep.pov", "+W80", "+H70",
                        "+UA", "+FN16", "+Oref16.png"], cwd=folder,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       check=True)
        _, expected = decode_rows(os.path.join(folder, "ref16.png"))
        self.assertEqual(actual, expected)

    def test_parse_error_fails_cleanly(self):
        folder = os.path.join(self.folder, "broken")
        os.makedirs(folder)
        with open(os.path.join(folder, "broken.pov"), "w") as out:
            out.write('#include "missing.inc"\nsphere { 0, 1 }\n')
        job_id = self.submit(folder, "--", "+W32", "+H32")
        job = wait_for_job(self.client, job_id)
        self.assertEqual(job["state"], "failed")
        self.assertIn("Cannot open include file missing.inc", job["error"])
        status = run_cli("status", self.server.url, job_id, "--token",
                         self.server.admin)
        self.assertEqual(status.returncode, 0)
        self.assertIn("missing.inc", status.stdout)
        fetched = self.fetch(job_id, os.path.join(self.folder, "none"))
        self.assertEqual(fetched.returncode, 1)
        self.assertIn("failed", fetched.stderr)

    def test_single_pov_file_job(self):
        folder = os.path.join(self.folder, "single")
        os.makedirs(folder)
        path = os.path.join(folder, "ball.pov")
        with open(path, "wb") as out:
            out.write(SPHERE_SCENE)
        job_id = self.submit(path, "--name", "ball <b>", "--",
                             "+W40", "+H30", "+KFF3", "+KC")
        job = wait_for_job(self.client, job_id)
        self.assertEqual(job["state"], "done", job["error"])
        self.assertEqual(job["frames"], 3)
        self.assertEqual(job["name"], "ball <b>")

    def test_api_requires_token(self):
        for token in (None, "wrong", self.server.worker):
            with self.subTest(token=token):
                request = urllib.request.Request(self.server.url +
                                                 "api/jobs")
                if token:
                    request.add_header("Authorization", "Bearer " + token)
                with self.assertRaises(urllib.error.HTTPError) as caught:
                    urllib.request.urlopen(request, timeout=10)
                self.assertEqual(caught.exception.code, 401)
                body = json.loads(caught.exception.read().decode())
                self.assertIn("token", body["error"])

    def test_bad_submit_gets_clear_error(self):
        path = os.path.join(self.folder, "bad.zip")
        make_zip(path, {"../evil.pov": b"x"})
        result = run_cli("submit", self.server.url, path, "--token",
                         self.server.admin)
        self.assertEqual(result.returncode, 1)
        self.assertIn("'..'", result.stderr)
        self.assertEqual(result.stdout, "")

    def test_unknown_job_is_404(self):
        with self.assertRaises(httpov.ApiError) as caught:
            self.client.call("GET", "/api/jobs/99999")
        self.assertEqual(caught.exception.status, 404)

    def test_status_page_login(self):
        opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor())
        with self.assertRaises(urllib.error.HTTPError) as caught:
            opener.open(self.server.url, timeout=10)
        self.assertEqual(caught.exception.code, 401)
        page = opener.open(self.server.url + "?token=" + self.server.admin,
                           timeout=10)
        self.assertEqual(page.geturl(), self.server.url)
        text = page.read().decode()
        self.assertIn("<h1>httpov</h1>", text)
        self.assertNotIn(self.server.admin, text)

    def test_token_command(self):
        result = run_cli("token", "--data", self.server.data_dir)
        self.assertEqual(result.returncode, 0)
        self.assertEqual(result.stdout.splitlines(), [
            "admin " + self.server.admin, "worker " + self.server.worker])


def write_script(folder, name, body):
    """Write an executable shell script that replaces POV-Ray in a test."""
    path = os.path.join(folder, name)
    with open(path, "w") as out:
        out.write("#!/bin/sh\n" + body + "\n")
    os.chmod(path, 0o755)
    return path


def result_zip(path, members):
    with zipfile.ZipFile(path, "w") as archive:
        for name, source in members.items():
            archive.write(source, name)
    return path


@needs_povray
class FailureTest(unittest.TestCase):
    """Bad renders, bad results and bad jobs end failed with a message."""

    def setUp(self):
        self.assertTrue(POVRAY, "POV-Ray is required (HTTPOV_CI=1)")
        self.folder = make_temp_dir(prefix="httpov-fail-")
        self.addCleanup(shutil.rmtree, self.folder, True)
        self.server = ServerProcess(os.path.join(self.folder, "data"),
                                    lease=5)
        self.addCleanup(self.server.stop)
        self.client = self.server.client()
        self.addCleanup(self.client.close)
        self.scene = os.path.join(self.folder, "ball.pov")
        with open(self.scene, "wb") as out:
            out.write(SPHERE_SCENE)
        self.processes = []
        self.addCleanup(self.stop_processes)

    def stop_processes(self):
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()

    def submit(self, *options):
        result = run_cli("submit", self.server.url, self.scene, "--token",
                         self.server.admin, *options)
        self.assertEqual(result.returncode, 0, result.stderr)
        return int(result.stdout)

    def work(self, *options):
        name = "w%d" % len(self.processes)
        log_path = os.path.join(self.folder, name + ".log")
        with open(log_path, "a") as log_file:
            process = subprocess.Popen(
                [sys.executable, os.path.join(HERE, "httpov.py"), "work",
                 self.server.url, "--token", self.server.worker,
                 "--threads", "1", "--workdir",
                 os.path.join(self.folder, name)] + list(options),
                stdout=log_file, stderr=log_file)
        self.processes.append(process)
        return process

    def worker_client(self):
        client = httpov.ApiClient(self.server.url, self.server.worker)
        self.addCleanup(client.close)
        worker = client.call("POST", "/api/workers", {"name": "test"})
        return client, worker["worker"]

    def test_windows_povray_flavour(self):
        # A stand-in for pvengine64.exe: it checks the Windows switches
        # and runs the real POV-Ray, whose messages then reach the
        # worker only through the +GA file, as with POV-Ray for Windows.
        engine = os.path.join(self.folder, "pvengine64.exe")
        with open(engine, "w") as out:
            out.write('#!/bin/sh\n[ "$1 $2 $3" = "/NR /EXIT /RENDER" ] || '
                      'exit 3\ncase "$4" in *.ini) first="$4";; '
                      '*) first="+I$4";; esac\nshift 4\n'
                      'exec %s "$first" "$@" 2>/dev/null\n' % POVRAY)
        os.chmod(engine, 0o755)
        good = self.submit("--", "+W32", "+H24")
        self.work("--povray", engine, "--sandbox", "none", "--workdir",
                  os.path.join(self.folder, "work dir"))
        job = wait_for_job(self.client, good, 120)
        self.assertEqual(job["state"], "done", job["error"])
        with open(self.scene, "wb") as out:
            out.write(b"sphere { 0, 1 pigment { colour Nowhere } }\n")
        bad = self.submit("--", "+W32", "+H24")
        job = wait_for_job(self.client, bad, 120)
        self.assertEqual(job["state"], "failed")
        self.assertIn("Nowhere", job["error"])

    def test_worker_exits_when_idle(self):
        job_id = self.submit("--", "+W32", "+H24")
        started = time.time()
        worker = self.work("--exit-when-idle", "3")
        self.assertEqual(worker.wait(60), 0)
        self.assertEqual(self.client.call("GET", "/api/jobs/%d"
                                          % job_id)["state"], "done")
        self.assertGreater(time.time() - started, 3)

    def test_scene_without_image_fails(self):
        script = write_script(self.folder, "no-image", "exit 0")
        job_id = self.submit("--", "+W32", "+H32")
        self.work("--povray", script, "--sandbox", "none")
        job = wait_for_job(self.client, job_id, 60)
        self.assertEqual(job["state"], "failed")
        self.assertIn("without writing the image", job["error"])

    def test_wrong_size_image_fails(self):
        script = write_script(self.folder, "wrong-size",
                              'exec %s "$@" +W17 +H13' % POVRAY)
        job_id = self.submit("--", "+W32", "+H32")
        self.work("--povray", script, "--sandbox", "none")
        job = wait_for_job(self.client, job_id, 60)
        self.assertEqual(job["state"], "failed")
        self.assertIn("image is 17x13, expected 32x32", job["error"])

    def test_stalled_povray_is_stopped(self):
        # A copy of sleep under a unique name finds POV-Ray's child later.
        marker = os.path.join(self.folder, "stall-marker")
        shutil.copy(shutil.which("sleep"), marker)
        script = write_script(self.folder, "stall", "%s 300 & wait" % marker)
        job_id = self.submit("--", "+W32", "+H32")
        self.work("--povray", script, "--stall-timeout", "1", "--sandbox",
                  "none")
        job = wait_for_job(self.client, job_id, 60)
        self.assertEqual(job["state"], "failed")
        self.assertIn("printed nothing for 1 s", job["error"])
        left = subprocess.run(["pgrep", "-f", marker],
                              stdout=subprocess.PIPE)
        self.assertEqual(left.stdout, b"", "POV-Ray's children survived")

    def test_task_time_limit(self):
        job_id = self.submit("--", "+W640", "+H480", "+A0.01", "+R9")
        self.work("--max-task-time", "1")
        job = wait_for_job(self.client, job_id, 60)
        self.assertEqual(job["state"], "failed")
        self.assertIn("longer than the limit of 1 s", job["error"])
        tasks = self.client.call("GET", "/api/jobs/%d/tasks" % job_id)
        self.assertEqual(tasks["tasks"][0]["attempts"], 3)

    def test_task_disk_limit(self):
        with open(self.scene, "wb") as out:
            out.write(fill_scene(b"fill.txt"))
        job_id = self.submit("--", "+W32", "+H24")
        worker = self.work("--max-task-disk", "5")
        job = wait_for_job(self.client, job_id, 120)
        self.assertEqual(job["state"], "failed")
        self.assertIn("files grew past the limit of 5 MiB", job["error"])
        with open(os.path.join(self.folder, "w0.log")) as log:
            self.assertRegex(log.read(), r"job %d task \d+ .*: stopping "
                             r"POV-Ray: the task's files grew" % job_id)
        self.assertIsNone(worker.poll(), "the worker exited")
        tasks = os.path.join(self.folder, "w0", "tasks")
        self.assertEqual(os.listdir(tasks), [],
                         "the failed task's files were left behind")

    def test_killed_povray_named_by_signal(self):
        script = write_script(self.folder, "killed", "kill -9 $$")
        job_id = self.submit("--", "+W32", "+H32")
        self.work("--povray", script, "--sandbox", "none")
        job = wait_for_job(self.client, job_id, 60)
        self.assertEqual(job["state"], "failed")
        self.assertIn("killed by SIGKILL", job["error"])

    def test_server_rejects_wrong_size_result(self):
        self.submit("--", "+W32", "+H32")
        client, worker_id = self.worker_client()
        task = client.call("POST", "/api/claim", {"worker": worker_id})
        task = task["task"]
        image = os.path.join(self.folder, "small.png")
        info = httpov.ImageInfo(16, 16, 8, 2)
        httpov.write_png(image, info, [(0, bytes(48))] * 16)
        upload = result_zip(os.path.join(self.folder, "r.zip"),
                            {"frames/0.png": image})
        path = "/api/tasks/%d/result?attempt=%s" % (task["id"],
                                                   task["attempt"])
        with self.assertRaises(httpov.ApiError) as caught:
            client.upload(path, upload)
        self.assertEqual(caught.exception.status, 400)
        self.assertIn("expected 32x32", caught.exception.message)
        stored = self.client.call("GET", "/api/jobs/%d/tasks"
                                  % task["job_id"])["tasks"][0]
        self.assertEqual(stored["state"], "queued")
        self.assertIn("invalid result", stored["error"])
        with self.assertRaises(httpov.ApiError) as caught:
            client.upload(path, upload)
        self.assertEqual(caught.exception.status, 409,
                         "the failed attempt is no longer current")

    def test_result_over_size_cap(self):
        self.server.stop()
        self.server = ServerProcess(os.path.join(self.folder, "data"),
                                    lease=5, extra=["--max-result-mib",
                                                    "0.01"])
        self.addCleanup(self.server.stop)
        self.client = self.server.client()
        self.addCleanup(self.client.close)
        job_id = self.submit("--", "+W320", "+H240")
        client, worker_id = self.worker_client()
        task = client.call("POST", "/api/claim", {"worker": worker_id})
        task = task["task"]
        upload = os.path.join(self.folder, "big.zip")
        with open(upload, "wb") as out:
            out.write(os.urandom(200000))
        with self.assertRaises(httpov.ApiError) as caught:
            client.upload("/api/tasks/%d/result?attempt=%s"
                          % (task["id"], task["attempt"]), upload)
        self.assertEqual(caught.exception.status, 413)
        self.assertIn("larger than the limit", caught.exception.message)
        client.call("POST", "/api/tasks/%d/release" % task["id"],
                    {"attempt": task["attempt"]})

        self.work()
        job = wait_for_job(self.client, job_id, 60)
        self.assertEqual(job["state"], "failed")
        self.assertIn("larger than the server's limit", job["error"])

    def test_work_runs_several_tasks_at_once(self):
        job_id = self.submit("--frames-per-task", "1", "--", "+W320",
                             "+H240", "+KFF4")
        self.work("--tasks", "2", "--name", "pair")
        deadline = time.time() + 60
        max_running = 0
        while time.time() < deadline:
            job = self.client.call("GET", "/api/jobs/%d" % job_id)
            max_running = max(max_running, job["tasks_running"])
            if job["state"] in httpov.FINAL_JOB_STATES:
                break
            time.sleep(0.1)
        self.assertEqual(job["state"], "done", job["error"])
        self.assertEqual(max_running, 2,
                         "two tasks rendered at the same time")
        names = sorted(worker["name"] for worker in self.client.call(
            "GET", "/api/workers")["workers"])
        self.assertEqual(names, ["pair-1", "pair-2"])

    def test_same_name_gets_own_identity(self):
        client = httpov.ApiClient(self.server.url, self.server.worker)
        self.addCleanup(client.close)
        first = client.call("POST", "/api/workers", {"name": "twin"})
        second = client.call("POST", "/api/workers", {"name": "twin"})
        self.assertNotEqual(first["worker"], second["worker"])

    def test_missing_archive_fails_only_its_job(self):
        broken = self.submit("--", "+W32", "+H32")
        with open(self.scene, "ab") as out:
            out.write(b"// another scene\n")
        healthy = self.submit("--", "+W32", "+H32")
        job = self.client.call("GET", "/api/jobs/%d" % broken)
        archives = os.path.join(self.server.data_dir, "archives")
        self.assertEqual(len(os.listdir(archives)), 2)
        first = sorted(os.listdir(archives),
                       key=lambda name: os.path.getmtime(
                           os.path.join(archives, name)))[0]
        os.remove(os.path.join(archives, first))
        client, worker_id = self.worker_client()
        task = client.call("POST", "/api/claim", {"worker": worker_id})
        self.assertEqual(task["task"]["job_id"], healthy)
        job = self.client.call("GET", "/api/jobs/%d" % broken)
        self.assertEqual(job["state"], "failed")
        self.assertIn("missing", job["error"])

    def test_busy_database_responds_503(self):
        self.server.stop()
        self.server = ServerProcess(os.path.join(self.folder, "data"),
                                    lease=5, extra=["--busy-timeout",
                                                    "0.2"])
        self.addCleanup(self.server.stop)
        self.client = self.server.client()
        self.addCleanup(self.client.close)
        job_id = self.submit("--", "+W32", "+H32", "+KFF2")
        import sqlite3
        lock = sqlite3.connect(os.path.join(self.server.data_dir,
                                            "httpov.sqlite3"),
                               isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")
        client = None
        try:
            client = httpov.ApiClient(self.server.url, self.server.worker)
            with self.assertRaises(httpov.ApiError) as caught:
                client.call("POST", "/api/workers", {"name": "busy"})
            self.assertEqual(caught.exception.status, 503)
            self.assertEqual(caught.exception.retry_after, 2)
            worker = self.work()
            time.sleep(4)
        finally:
            lock.execute("ROLLBACK")
            lock.close()
            if client:
                client.close()
        job = wait_for_job(self.client, job_id, 60)
        self.assertEqual(job["state"], "done")
        with open(os.path.join(self.folder, "w0.log")) as source:
            self.assertIn("server busy; retrying", source.read())
        self.assertIsNone(worker.poll())

    def test_repeat_failures_keep_worker_away(self):
        script = write_script(self.folder, "broken", "exit 1")
        self.submit("--frames-per-task", "1", "--", "+W32", "+H32",
                    "+KFF9")
        client, worker_id = self.worker_client()
        for number in range(3):
            task = client.call("POST", "/api/claim",
                               {"worker": worker_id})["task"]
            client.call("POST", "/api/tasks/%d/fail" % task["id"],
                        {"attempt": task["attempt"], "error": "broken"})
        answer = client.call("POST", "/api/claim", {"worker": worker_id})
        self.assertIsNone(answer["task"],
                          "a worker that failed 3 tasks is kept away")
        other, other_id = self.worker_client()
        answer = other.call("POST", "/api/claim", {"worker": other_id})
        self.assertIsNotNone(answer["task"])
        del script

    def test_job_command_controls_job(self):
        job_id = self.submit("--", "+W32", "+H32", "+KFF3")

        def job_cli(*arguments):
            return run_cli("job", self.server.url, job_id, "--token",
                           self.server.admin, *arguments)

        def state():
            return self.client.call("GET", "/api/jobs/%d" % job_id)

        result = job_cli("pause")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(state()["state"], "paused")
        client, worker_id = self.worker_client()
        answer = client.call("POST", "/api/claim", {"worker": worker_id})
        self.assertIsNone(answer["task"], "a paused job hands out nothing")
        result = job_cli("--priority", "5", "--max-workers", "2")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual((state()["priority"], state()["max_workers"]),
                         (5, 2))
        self.assertEqual(job_cli("resume").returncode, 0)
        self.assertEqual(state()["state"], "queued")
        self.assertEqual(job_cli("cancel").returncode, 0)
        self.assertEqual(state()["state"], "cancelled")
        again = job_cli("cancel")
        self.assertEqual(again.returncode, 1)
        self.assertIn("already cancelled", again.stderr)
        self.assertEqual(job_cli("retry").returncode, 0)
        self.assertEqual(state()["state"], "queued")
        self.assertEqual(job_cli("delete").returncode, 0)
        with self.assertRaises(httpov.ApiError) as caught:
            state()
        self.assertEqual(caught.exception.status, 404)
        self.assertEqual(os.listdir(os.path.join(self.server.data_dir,
                                                 "archives")), [])

    def test_cancel_requeues_refused_result(self):
        job_id = self.submit("--", "+W32", "+H32")
        client, worker_id = self.worker_client()
        task = client.call("POST", "/api/claim", {"worker": worker_id})
        task = task["task"]
        self.client.call("POST", "/api/jobs/%d/cancel" % job_id)
        beat = client.call("POST", "/api/tasks/%d/heartbeat" % task["id"],
                           {"attempt": task["attempt"],
                            "worker": worker_id})
        self.assertEqual(beat["action"], "stop")
        image = os.path.join(self.folder, "frame.png")
        httpov.write_png(image, httpov.ImageInfo(32, 32, 8, 2),
                         [(0, bytes(96))] * 32)
        upload = result_zip(os.path.join(self.folder, "r.zip"),
                            {"frames/0.png": image})
        with self.assertRaises(httpov.ApiError) as caught:
            client.upload("/api/tasks/%d/result?attempt=%s"
                          % (task["id"], task["attempt"]), upload)
        self.assertEqual(caught.exception.status, 409)
        self.assertIn("cancelled", caught.exception.message)
        self.client.call("POST", "/api/jobs/%d/retry" % job_id)
        again = client.call("POST", "/api/claim", {"worker": worker_id})
        self.assertEqual(again["task"]["id"], task["id"],
                         "the task is queued again at once")

    def test_job_ids_not_reused(self):
        first = self.submit("--", "+W32", "+H32")
        self.client.call("POST", "/api/jobs/%d/delete" % first)
        second = self.submit("--", "+W32", "+H32")
        self.assertGreater(second, first)

    def test_second_server_on_same_data_rejected(self):
        result = run_cli("serve", "--bind", "127.0.0.1", "--port", "0",
                         "--data", self.server.data_dir, timeout=30)
        self.assertEqual(result.returncode, 1)
        self.assertIn("in use by another httpov server", result.stderr)

    def test_worker_without_povray_exits(self):
        result = run_cli("work", self.server.url, "--token",
                         self.server.worker, "--povray", "/nonexistent/pov",
                         timeout=30)
        self.assertEqual(result.returncode, 1)
        self.assertIn("not found", result.stderr)

    def test_large_job_schedules(self):
        started = time.time()
        job_id = self.submit("--", "+W32", "+H32", "+KFF100000")
        seconds = time.time() - started
        job = self.client.call("GET", "/api/jobs/%d" % job_id)
        self.assertEqual(job["tasks"], 100000)
        client, worker_id = self.worker_client()
        task = client.call("POST", "/api/claim", {"worker": worker_id})
        self.assertEqual(task["task"]["frame_first"], 1)
        sys.stderr.write("(100,000-frame job accepted in %.1f s) "
                         % seconds)
        self.client.call("POST", "/api/jobs/%d/delete" % job_id)


@needs_povray
class OutboxTest(unittest.TestCase):
    """A result rendered while the server is down survives the worker."""

    def test_restarted_worker_delivers_kept_result(self):
        self.assertTrue(POVRAY, "POV-Ray is required (HTTPOV_CI=1)")
        folder = make_temp_dir(prefix="httpov-outbox-")
        self.addCleanup(shutil.rmtree, folder, True)
        data = os.path.join(folder, "data")
        server = ServerProcess(data, lease=30)
        port = server.port
        scene = os.path.join(folder, "ball.pov")
        with open(scene, "wb") as out:
            out.write(SPHERE_SCENE)
        # About 4 s with one thread: the server is stopped mid-render.
        options = ["+W480", "+H360", "+A0.0", "+R9"]
        result = run_cli("submit", server.url, scene, "--token",
                         server.admin, "--", *options)
        self.assertEqual(result.returncode, 0, result.stderr)
        job_id = int(result.stdout)
        client = server.client()
        first = start_worker(server, folder, "w")
        self.addCleanup(first.kill)
        deadline = time.time() + 30
        while not client.call("GET", "/api/jobs/%d" % job_id)[
                "tasks_running"]:
            self.assertLess(time.time(), deadline, "task never started")
            time.sleep(0.1)
        client.close()
        server.stop()

        log_path = os.path.join(folder, "w.log")
        deadline = time.time() + 60
        while True:
            with open(log_path) as source:
                if "result kept" in source.read():
                    break
            self.assertLess(time.time(), deadline, "no delivery attempt")
            time.sleep(0.2)
        first.kill()
        first.wait()
        outbox = os.path.join(folder, "w", "outbox")
        self.assertEqual(len([name for name in os.listdir(outbox)
                              if name.endswith(".zip")]), 1)

        server = ServerProcess(data, lease=30, port=port)
        self.addCleanup(server.stop)
        client = server.client()
        self.addCleanup(client.close)
        second = start_worker(server, folder, "w")
        self.addCleanup(second.kill)
        job = wait_for_job(client, job_id, 60)
        self.assertEqual(job["state"], "done", job["error"])
        tasks = client.call("GET", "/api/jobs/%d/tasks" % job_id)["tasks"]
        self.assertEqual(tasks[0]["attempts"], 1,
                         "the kept result was delivered, not re-rendered")
        self.assertEqual(os.listdir(outbox), [])
        target = os.path.join(folder, "frame.png")
        client.download("/api/jobs/%d/frames/0.png" % job_id, target)
        subprocess.run([POVRAY, "-D", "+WT1", "+Iball.pov", "+FN8",
                        "+Oref.png"] + options, cwd=folder,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       check=True)
        self.assertEqual(decode_rows(target),
                         decode_rows(os.path.join(folder, "ref.png")))


@needs_povray
class InterruptTest(unittest.TestCase):
    """Ctrl-C on a worker: once finishes the task, twice gives it back."""

    def setUp(self):
        self.assertTrue(POVRAY, "POV-Ray is required (HTTPOV_CI=1)")
        self.folder = make_temp_dir(prefix="httpov-int-")
        self.addCleanup(shutil.rmtree, self.folder, True)
        self.server = ServerProcess(os.path.join(self.folder, "data"))
        self.addCleanup(self.server.stop)
        self.client = self.server.client()
        self.addCleanup(self.client.close)
        result = run_cli("submit", self.server.url,
                         os.path.join(EXAMPLES, "sliced-still"), "--token",
                         self.server.admin)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.job_id = int(result.stdout)
        self.worker = start_worker(self.server, self.folder, "w")
        self.addCleanup(self.stop_worker)
        deadline = time.time() + 30
        while time.time() < deadline:
            job = self.client.call("GET", "/api/jobs/%d" % self.job_id)
            if job["tasks_running"]:
                break
            time.sleep(0.2)
        self.assertEqual(job["tasks_running"], 1)
        time.sleep(1)

    def stop_worker(self):
        if self.worker.poll() is None:
            self.worker.kill()
            self.worker.wait()

    def test_one_interrupt_finishes_task(self):
        self.worker.send_signal(signal.SIGINT)
        self.assertEqual(self.worker.wait(60), 0)
        job = self.client.call("GET", "/api/jobs/%d" % self.job_id)
        self.assertEqual(job["state"], "done")

    def test_two_interrupts_release_task(self):
        self.worker.send_signal(signal.SIGINT)
        time.sleep(0.3)
        self.worker.send_signal(signal.SIGINT)
        self.assertEqual(self.worker.wait(20), 0)
        job = self.client.call("GET", "/api/jobs/%d" % self.job_id)
        self.assertEqual(job["state"], "running")
        self.assertEqual(job["tasks_queued"], 1)
        tasks = self.client.call("GET", "/api/jobs/%d/tasks" % self.job_id)
        self.assertEqual(tasks["tasks"][0]["attempts"], 0,
                         "a released task does not use up an attempt")


@needs_povray
class RenderCommandTest(unittest.TestCase):

    def test_render_small_animation(self):
        folder = make_temp_dir()
        self.addCleanup(shutil.rmtree, folder)
        with open(os.path.join(folder, "spin.pov"), "wb") as out:
            out.write(SPHERE_SCENE)
        output = os.path.join(folder, "out")
        result = run_cli("render", os.path.join(folder, "spin.pov"),
                         "-o", output, "--workers", "2", "--",
                         "+W48", "+H36", "+KFF4")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(sorted(os.listdir(output)),
                         ["spin_%d.png" % frame for frame in (1, 2, 3, 4)])
        self.assertIn("frames 4/4", result.stderr)

    def test_render_scene_without_size(self):
        folder = make_temp_dir()
        self.addCleanup(shutil.rmtree, folder)
        with open(os.path.join(folder, "plain.pov"), "wb") as out:
            out.write(SPHERE_SCENE)
        output = os.path.join(folder, "out")
        result = run_cli("render", os.path.join(folder, "plain.pov"),
                         "-o", output, "--slices", "3")
        self.assertEqual(result.returncode, 0, result.stderr)
        info, _ = decode_rows(os.path.join(output, "plain.png"))
        self.assertEqual((info.width, info.height), (800, 600),
                         "POV-Ray's system default size, as one machine "
                         "renders it")

    def test_render_missing_povray(self):
        result = run_cli("render", os.path.join(EXAMPLES, "animation"),
                         "--povray", "/nonexistent/povray")
        self.assertEqual(result.returncode, 1)
        self.assertIn("--povray PATH", result.stderr)

    def test_render_missing_path(self):
        result = run_cli("render", "/nonexistent/scene.pov")
        self.assertEqual(result.returncode, 1)
        self.assertIn("no such file", result.stderr)


# ---------------------------------------------------------------------------
# 6. Hostile input: archives, options, requests, slow clients, fuzzing
# ---------------------------------------------------------------------------

def zip_bytes(members, compression=zipfile.ZIP_STORED):
    """Return a zip archive as bytes from (name or ZipInfo, data) pairs."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for member, data in members:
            archive.writestr(member, data)
    return buffer.getvalue()


def special_member(name, file_type):
    info = zipfile.ZipInfo(name)
    info.external_attr = (file_type | 0o644) << 16
    return info


def encrypted_zip():
    """Return a zip whose member has the 'encrypted' flag set."""
    data = bytearray(zip_bytes([("secret.pov", b"sphere{0,1}")]))
    local = data.find(b"PK\x03\x04")
    central = data.find(b"PK\x01\x02")
    data[local + 6] |= 1
    data[central + 8] |= 1
    return bytes(data)


def corrupt_zip():
    """Return a zip whose member's data no longer matches its CRC."""
    data = bytearray(zip_bytes(GOOD_SCENE + [("x.inc", b"hello world")]))
    data[data.find(b"hello world")] ^= 0x20
    return bytes(data)


def binary_digits(count, seed=5):
    """Return text of random 0s and 1s: it deflates only about 7:1."""
    generator = __import__("random").Random(seed)
    return bytes(generator.choice(b"01") for _ in range(count))


GOOD_SCENE = [("s.pov", SPHERE_SCENE)]
ANIMATED_SCENE = [("a.ini", b"Input_File_Name=a.pov\nFinal_Frame=10\n"),
                  ("a.pov", SPHERE_SCENE)]


def hostile_archives():
    """(case, zip bytes, query, status, message) for job uploads."""
    many = [("f%05d.inc" % number, b"") for number in range(10001)]
    return [
        ("absolute path", zip_bytes([("/etc/x.pov", b"")]), "", 400,
         "absolute path"),
        ("dot-dot", zip_bytes([("../x.pov", b"")]), "", 400, "'..'"),
        ("nested dot-dot", zip_bytes([("a/../../x.pov", b"")]), "", 400,
         "'..'"),
        ("drive letter", zip_bytes([("C:/x.pov", b"")]), "", 400,
         "absolute path"),
        ("backslash", zip_bytes([("a\\x.pov", b"")]), "", 400,
         "backslashes"),
        ("symlink", zip_bytes([(special_member("l.pov", stat.S_IFLNK),
                                "/etc/passwd")]), "", 400,
         "symbolic link"),
        ("device file", zip_bytes([(special_member("d.pov", stat.S_IFCHR),
                                    "")]), "", 400, "device, pipe"),
        ("fifo", zip_bytes([(special_member("p.pov", stat.S_IFIFO), "")]),
         "", 400, "device, pipe"),
        ("duplicate names", zip_bytes([("a.pov", b"1"), ("A.pov", b"2")]),
         "", 400, "twice"),
        ("file and folder", zip_bytes([("a", b""), ("a/b.pov", b"")]), "",
         400, "both as a file and as a folder"),
        ("too many files", zip_bytes(many), "", 400, "more than the limit"),
        ("too large unpacked",
         zip_bytes([("big.inc", binary_digits(5 << 20))] + GOOD_SCENE,
                   zipfile.ZIP_DEFLATED), "", 413, "unpacks to"),
        ("zip bomb", zip_bytes([("z.inc", bytes(3 << 20))] + GOOD_SCENE,
                               zipfile.ZIP_DEFLATED), "", 400, "zip bomb"),
        ("encrypted", encrypted_zip(), "", 400, "encrypted"),
        ("not a zip", b"this is not a zip", "", 400, "not a valid zip"),
        ("empty archive", zip_bytes([]), "", 400, "empty"),
        ("no scene", zip_bytes([("readme.txt", b"")]), "", 400,
         "no .ini or .pov"),
        ("missing scene", zip_bytes([("j.ini", b"Input_File_Name=x.pov\n"),
                                     ("y.txt", b"")]), "", 400,
         "'x.pov' not found"),
        ("two scenes", zip_bytes([("a.pov", b""), ("b.pov", b"")]), "",
         400, "several scene files"),
        ("shell command in ini",
         zip_bytes([("j.ini", b"Input_File_Name=s.pov\n"
                              b"Post_Frame_Command=rm -rf /\n")] +
                   GOOD_SCENE), "", 400, "runs a shell command"),
        ("stream file in ini",
         zip_bytes([("j.ini", b"Input_File_Name=s.pov\n"
                              b"Debug_File=/tmp/httpov-owned.txt\n")] +
                   GOOD_SCENE), "", 400, "httpov-owned.txt"),
        ("scene outside job",
         zip_bytes([("j.ini", b"Input_File_Name=../../etc/x.pov\n")] +
                   GOOD_SCENE), "", 400, "'..'"),
        ("rows in ini",
         zip_bytes([("j.ini", b"Input_File_Name=s.pov\nStart_Row=5\n")] +
                   GOOD_SCENE), "", 400, "Start Row"),
        ("corrupt member", corrupt_zip(), "", 400, "CRC"),
        ("garbage ini",
         zip_bytes([("j.ini", b"\x00\xff junk words\n")] + GOOD_SCENE), "",
         400, "neither a setting nor a switch"),
    ]


def hostile_options():
    """(case, zip bytes, query, status, message) for job options."""
    good = zip_bytes(GOOD_SCENE)
    animated = zip_bytes(ANIMATED_SCENE)
    return [
        ("frames not numeric", animated, "frames=abc", 400,
         "invalid frame range"),
        ("frames reversed", animated, "frames=5-2", 400,
         "comes before the first"),
        ("frames out of range", animated, "frames=1-99", 400,
         "the animation has frames 1-10"),
        ("frames on a still", good, "frames=1-2", 400, "not an animation"),
        ("zero slices", good, "slices=0", 400, "must be at least 1"),
        ("negative slices", good, "slices=-3", 400, "must be at least 1"),
        ("too many slices", good, "slices=601", 400, "at most 600"),
        ("rows not numeric", good, "rows_per_slice=abc", 400,
         "expected a whole number"),
        ("slices and rows", good, "slices=2&rows_per_slice=64", 400,
         "not both"),
        ("zero frames per task", animated, "frames_per_task=0", 400,
         "must be at least 1"),
        ("negative max workers", good, "max_workers=-1", 400,
         "must be at least 0"),
        ("huge priority", good, "priority=99999999999", 400,
         "must be at most"),
        ("control character in name", good, "name=a%0Ab", 400,
         "invalid job name"),
        ("unknown scene option", good, "scene=other.pov", 400,
         "'other.pov' not found"),
        ("width over limit", good, "option=%2BW100000", 400,
         "must be 1 to 32768"),
        ("negative height", good, "option=%2BH-5", 400, "must be 1 to"),
        ("too many pixels", good, "option=%2BW20000&option=%2BH20000",
         400, "too large"),
        ("shell command option", good,
         "option=Pre_Scene_Command%3Dtouch", 400, "runs a shell command"),
        ("options hidden behind white space", good,
         "option=%2BA0.3%20%2BGI/tmp/httpov-owned.ini", 400,
         "contains white space"),
        ("setting hidden behind a tab", good,
         "option=Antialias%3Don%09Pre_Scene_Command%3Did", 400,
         "contains white space"),
        ("infinite width", good, "option=Width%3Dinf", 400,
         "expected a finite number"),
        ("not-a-number clock", animated, "option=Initial_Clock%3Dnan", 400,
         "expected a finite number"),
        ("output path option", good, "option=%2BO/tmp/httpov-owned.png",
         400, "set by the farm"),
        ("stream file option", good, "option=%2BGF/tmp/httpov-owned.txt",
         400, "writes POV-Ray's output to the file"),
        ("create ini option", good, "option=%2BGI/tmp/httpov-owned.ini",
         400, "writes POV-Ray's output to the file"),
        ("include header outside", good, "option=%2BHI/etc/passwd", 400,
         "absolute path"),
        ("include header missing", good, "option=%2BHImissing.inc", 400,
         "not found in the job"),
        ("start row option", good, "option=%2BSR5", 400, "set by the farm"),
        ("subset frame option", animated, "option=%2BSF2", 400,
         "--frames"),
        ("bare word option", good, "option=scene", 400,
         "expected a switch"),
        ("option with newline", good, "option=%2BW10%0A%2BH10", 400,
         "line break"),
        ("reversed animation", good, "option=%2BKFI9&option=%2BKFF2", 400,
         "comes before"),
    ]


@needs_povray
class HostileInputTest(unittest.TestCase):
    """Each hostile input gets an exact status and a message naming the
    problem; the server goes on serving and writes only in its data."""

    @classmethod
    def setUpClass(cls):
        cls.folder = make_temp_dir(prefix="httpov-hostile-")
        cls.server = ServerProcess(os.path.join(cls.folder, "data"),
                                   extra=["--max-job-mib", "1"])
        cls.before = cls.snapshot()

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()
        shutil.rmtree(cls.folder, ignore_errors=True)

    @classmethod
    def snapshot(cls):
        """List every file outside the data folder that a test could see."""
        files = set()
        for folder, subfolders, names in os.walk(cls.folder):
            if folder.startswith(cls.server.data_dir):
                continue
            files.update(os.path.join(folder, name) for name in names)
        files.update(name for name in os.listdir(tempfile.gettempdir())
                     if name.startswith("httpov-owned"))
        return files

    def request(self, method, path, body=b"", headers=None,
                token="admin"):
        """Send one raw request; return (status, decoded JSON or text)."""
        connection = http.client.HTTPConnection("127.0.0.1",
                                                self.server.port,
                                                timeout=30)
        all_headers = {"Content-Length": str(len(body))}
        if token:
            all_headers["Authorization"] = "Bearer " + {
                "admin": self.server.admin, "worker": self.server.worker
            }.get(token, token)
        all_headers.update(headers or {})
        try:
            connection.putrequest(method, path, skip_accept_encoding=True)
            for name, value in all_headers.items():
                if value is not None:
                    connection.putheader(name, value)
            connection.endheaders(body)
            response = connection.getresponse()
            data = response.read().decode("utf-8", "replace")
        finally:
            connection.close()
        try:
            return response.status, json.loads(data)["error"]
        except (ValueError, KeyError, TypeError):
            return response.status, data

    def check_table(self, table):
        self.assertGreater(len(table), 0)
        for case, body, query, status, message in table:
            with self.subTest(case=case):
                got_status, error = self.request("POST",
                                                 "/api/jobs?" + query, body)
                self.assertEqual(got_status, status, error)
                self.assertIn(message, error)

    def test_hostile_archives(self):
        self.check_table(hostile_archives())

    def test_hostile_job_options(self):
        self.check_table(hostile_options())

    def test_hostile_requests(self):
        client = httpov.ApiClient(self.server.url, self.server.worker)
        self.addCleanup(client.close)
        worker = client.call("POST", "/api/workers", {"name": "h"})["worker"]
        table = [
            ("malformed JSON", "POST", "/api/claim", b"{nope", {}, "worker",
             400, "not valid JSON"),
            ("JSON array", "POST", "/api/claim", b"[1]", {}, "worker", 400,
             "must be a JSON object"),
            ("worker id as string", "POST", "/api/claim",
             b'{"worker": "1"}', {}, "worker", 400,
             "invalid field 'worker'"),
            ("missing worker id", "POST", "/api/claim", b"{}", {}, "worker",
             400, "missing field 'worker'"),
            ("unknown worker", "POST", "/api/claim", b'{"worker": 999}', {},
             "worker", 404, "worker 999 not found"),
            ("progress as string", "POST", "/api/tasks/1/heartbeat",
             json.dumps({"attempt": "a", "worker": worker,
                         "progress": "x"}).encode(), {}, "worker", 400,
             "invalid field 'progress'"),
            ("heartbeat unknown task", "POST", "/api/tasks/424242/heartbeat",
             json.dumps({"attempt": "a", "worker": worker}).encode(), {},
             "worker", 409, "no longer exists"),
            ("result without attempt", "POST", "/api/tasks/1/result", b"x",
             {}, "worker", 400, "missing attempt"),
            ("unknown job", "GET", "/api/jobs/999", b"", {}, "admin", 404,
             "job 999 not found"),
            ("huge job id", "GET", "/api/jobs/99999999999999999999999", b"",
             {}, "admin", 404, "no such page"),
            ("huge task id", "POST", "/api/tasks/9223372036854775808/fail",
             b"{}", {}, "worker", 404, "no such page"),
            ("wrong method", "PUT", "/api/jobs", b"", {}, "admin", 405,
             "not allowed"),
            ("unknown method", "BREW", "/", b"", {}, "admin", 405,
             "not allowed"),
            ("unknown method on unknown path", "BREW", "/nowhere", b"", {},
             "admin", 404, "no such page"),
            ("archive traversal", "GET", "/api/archives/../tokens.json", b"",
             {}, "worker", 404, "no such page"),
            ("encoded traversal", "GET", "/api/archives/%2e%2e%2ftokens.json",
             b"", {}, "worker", 404, "no such page"),
            ("frame traversal", "GET", "/api/jobs/1/frames/../../x.png", b"",
             {}, "admin", 404, "no such page"),
            ("dot-dot root", "GET", "/../../etc/passwd", b"", {}, "admin",
             404, "no such page"),
            ("unknown archive", "GET", "/api/archives/" + "0" * 64 + ".zip",
             b"", {}, "worker", 404, "not found"),
            ("upload over limit", "POST", "/api/jobs", b"x" * (2 << 20), {},
             "admin", 413, "larger than the limit"),
            ("missing length", "POST", "/api/jobs", b"",
             {"Content-Length": None}, "admin", 411,
             "missing Content-Length"),
            ("negative length", "POST", "/api/claim", b"",
             {"Content-Length": "-5"}, "worker", 400,
             "invalid Content-Length"),
            ("huge headers", "GET", "/api/jobs", b"",
             {"X-Padding": "a" * 20000}, "admin", 431, "headers are larger"),
            ("no token", "GET", "/api/jobs", b"", {}, None, 401,
             "missing token"),
            ("wrong token", "GET", "/api/jobs", b"", {}, "bad", 401,
             "invalid token"),
            ("worker token on admin call", "GET", "/api/jobs", b"", {},
             "worker", 401, "needs the admin token"),
            ("admin call with cookie POST", "POST", "/api/jobs/1/cancel",
             b"", {"Cookie": "httpov_session=x"}, None, 401,
             "missing token"),
        ]
        self.assertGreater(len(table), 20)
        for case, method, path, body, headers, token, status, message in \
                table:
            with self.subTest(case=case):
                got_status, error = self.request(method, path, body,
                                                 headers, token)
                self.assertEqual(got_status, status, error)
                self.assertIn(message, error)

    def test_hostile_results(self):
        bomb = zip_bytes([("frames/%d.png" % frame, httpov.PNG_SIGNATURE +
                           bytes(50 << 20)) for frame in range(1, 10)],
                         zipfile.ZIP_DEFLATED)
        table = [
            ("not a zip", b"garbage", 400, "not a valid zip"),
            ("missing frame", zip_bytes([("log.txt", b"")]), 400,
             "is missing frames/"),
            ("not a PNG", None, 400, "is not a PNG file"),
            ("decompression bomb", bomb, 413, "a 32x32 PNG can need"),
            ("corrupt member", None, 400, "corrupt"),
        ]
        client = httpov.ApiClient(self.server.url, self.server.worker)
        self.addCleanup(client.close)
        for case, body, status, message in table:
            with self.subTest(case=case):
                # A fresh job each time: three failures would fail a job.
                status_code, error = self.request(
                    "POST", "/api/jobs?option=%2BW32&option=%2BH32&"
                    "option=%2BKFF9", zip_bytes(GOOD_SCENE))
                self.assertEqual(status_code, 201, error)
                worker = client.call("POST", "/api/workers",
                                     {"name": case})["worker"]
                task = client.call("POST", "/api/claim",
                                   {"worker": worker})["task"]
                name = "frames/%d.png" % task["frame_first"]
                if case == "not a PNG":
                    body = zip_bytes([(name, b"GIF89a")])
                elif case == "corrupt member":
                    body = bytearray(zip_bytes([(name, httpov.PNG_SIGNATURE
                                                 + b"payload")]))
                    body[body.find(b"payload")] ^= 1
                    body = bytes(body)
                got, error = self.request(
                    "POST", "/api/tasks/%d/result?attempt=%s"
                    % (task["id"], task["attempt"]), body, token="worker")
                self.assertEqual(got, status, error)
                self.assertIn(message, error)
        self.assertEqual(os.listdir(os.path.join(self.server.data_dir,
                                                 "tmp")), [])

    def test_truncated_upload_leaves_no_file(self):
        connection = socket.create_connection(("127.0.0.1",
                                               self.server.port))
        connection.sendall(b"POST /api/jobs HTTP/1.1\r\nAuthorization: "
                           b"Bearer " + self.server.admin.encode() +
                           b"\r\nContent-Length: 100000\r\n\r\nPK")
        temp = os.path.join(self.server.data_dir, "tmp")
        deadline = time.time() + 10
        while not os.listdir(temp) and time.time() < deadline:
            time.sleep(0.05)
        self.assertNotEqual(os.listdir(temp), [], "no upload file started")
        connection.close()
        deadline = time.time() + 10
        while os.listdir(temp) and time.time() < deadline:
            time.sleep(0.1)
        self.assertEqual(os.listdir(temp), [])

    def test_slow_client_cut_off(self):
        connection = socket.create_connection(("127.0.0.1",
                                               self.server.port))
        self.addCleanup(connection.close)
        connection.sendall(b"GET /api/jobs HTTP/1.1\r\n")
        connection.settimeout(httpov.HEADER_TIMEOUT_SECONDS + 10)
        started = time.time()
        self.assertEqual(connection.recv(100), b"",
                         "the server closes a connection that sends no "
                         "headers")
        self.assertLess(time.time() - started,
                        httpov.HEADER_TIMEOUT_SECONDS + 5)
        status, _ = self.request("GET", "/api/jobs")
        self.assertEqual(status, 200)

    def test_unread_body_of_any_method_closes(self):
        # The body is a request of its own. Left unread on a kept
        # connection, it would be handled as the next request.
        smuggled = b"GET /api/openapi.json HTTP/1.1\r\nHost: x\r\n\r\n"
        for method in (b"DELETE", b"GET", b"OPTIONS"):
            connection = socket.create_connection(("127.0.0.1",
                                                   self.server.port), 10)
            self.addCleanup(connection.close)
            connection.sendall(method + b" /api/jobs HTTP/1.1\r\nHost: x"
                               b"\r\nContent-Length: %d\r\n\r\n"
                               % len(smuggled) + smuggled)
            connection.settimeout(5)
            response = read_until_closed(connection)
            self.assertEqual(response.count("HTTP/1.1 "), 1, response)
            self.assertIn("Connection: close", response)

    def test_slow_form_body_cut_off(self):
        # The job page's form needs no token until its body is read, so
        # its body has the same deadline as any upload.
        connection = socket.create_connection(("127.0.0.1",
                                               self.server.port))
        self.addCleanup(connection.close)
        connection.sendall(b"POST /jobs/1/control HTTP/1.1\r\n"
                           b"Content-Length: 1000\r\n\r\nc")
        connection.settimeout(httpov.HEADER_TIMEOUT_SECONDS + 10)
        started = time.time()
        while connection.recv(4096):
            pass
        self.assertLess(time.time() - started,
                        httpov.HEADER_TIMEOUT_SECONDS + 5)

    def test_names_are_escaped_on_status_page(self):
        name = "<script>alert('x')</script> \"quoted\" caf\u00e9 \u6f22"
        query = urllib.parse.urlencode({"name": name})
        status, error = self.request("POST", "/api/jobs?" + query,
                                     zip_bytes(GOOD_SCENE))
        self.assertEqual(status, 201, error)
        connection = http.client.HTTPConnection("127.0.0.1",
                                                self.server.port)
        connection.request("GET", "/", headers={
            "Authorization": "Bearer " + self.server.admin})
        response = connection.getresponse()
        page = response.read().decode()
        connection.close()
        self.assertNotIn("<script>", page)
        self.assertIn("&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;",
                      page)
        self.assertIn("&quot;quoted&quot; caf\u00e9 \u6f22", page)
        self.assertIn("default-src 'none'",
                      response.getheader("Content-Security-Policy"))
        self.assertEqual(response.getheader("X-Content-Type-Options"),
                         "nosniff")

    def test_zz_server_alive_and_nothing_outside_data(self):
        status, _ = self.request("GET", "/api/jobs")
        self.assertEqual(status, 200)
        self.assertEqual(self.snapshot(), self.before)
        self.assertIsNone(self.server.process.poll())


@needs_povray
class FuzzTest(unittest.TestCase):
    """Random requests on loopback: no 500, and the server survives."""

    REQUESTS = 600
    SECONDS = 60

    def test_random_requests(self):
        import random
        generator = random.Random(1234)
        folder = make_temp_dir(prefix="httpov-fuzz-")
        self.addCleanup(shutil.rmtree, folder, True)
        server = ServerProcess(os.path.join(folder, "data"))
        self.addCleanup(server.stop)
        methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD",
                   "OPTIONS", "BREW", "get"]
        segments = ["api", "jobs", "tasks", "workers", "claim", "archives",
                    "frames", "1", "0", "-1", "99999999999999999999", "..",
                    "%2e%2e", "%00", "x.png", "1.png", "result", "fail",
                    "heartbeat", "release", "pause", "delete", "retry",
                    "\u00e9", "a" * 300, "", "?token=x", "?attempt=",
                    "0" * 64 + ".zip"]
        bodies = [b"", b"{}", b"[]", b"null", b"{nope", b'{"worker": 1}',
                  b'{"worker": "x", "attempt": 5}', b'{"progress": 1e999}',
                  b'{"attempt": "a", "worker": 1, "progress": -1}',
                  zip_bytes(GOOD_SCENE), b"PK\x03\x04garbage",
                  bytes(generator.randrange(256) for _ in range(300))]
        tokens = [None, server.admin, server.worker, "x", ""]
        statuses = collections_counter()
        deadline = time.time() + self.SECONDS
        for number in range(self.REQUESTS):
            if time.time() > deadline:
                break
            method = generator.choice(methods)
            path = "/" + "/".join(generator.choice(segments) for _ in
                                  range(generator.randrange(0, 6)))
            body = generator.choice(bodies)
            headers = {"Content-Length": str(len(body))}
            token = generator.choice(tokens)
            if token is not None:
                headers["Authorization"] = "Bearer " + token
            if generator.random() < 0.2:
                headers["Content-Type"] = generator.choice(
                    ["application/json", "text/html", "\u00ff", "x" * 500])
            if generator.random() < 0.1:
                headers["Cookie"] = "httpov_session=" + generator.choice(
                    ["", "x", server.admin])
            connection = http.client.HTTPConnection(
                "127.0.0.1", server.port, timeout=30)
            try:
                connection.putrequest(method, urllib.parse.quote(
                    path, safe="/%?=&.-"),
                                      skip_host=True,
                                      skip_accept_encoding=True)
                for name, value in headers.items():
                    connection.putheader(name, value.encode("utf-8"))
                connection.endheaders(body)
                response = connection.getresponse()
                response.read()
                statuses[response.status] += 1
            except (http.client.HTTPException, OSError) as error:
                statuses[type(error).__name__] += 1
            finally:
                connection.close()
        self.assertNotIn(500, statuses, dict(statuses))
        self.assertGreater(sum(statuses.values()), 100)
        self.assertIsNone(server.process.poll(), "the server crashed")
        client = server.client()
        self.addCleanup(client.close)
        self.assertIn("jobs", client.call("GET", "/api/jobs"))
        with open(server.log_path) as source:
            self.assertNotIn("Traceback", source.read())


def collections_counter():
    import collections
    return collections.Counter()


@needs_povray
class OpenApiTest(unittest.TestCase):
    """The API description covers every route, and schemathesis finds no
    server error or response that breaks it."""

    @classmethod
    def setUpClass(cls):
        cls.folder = make_temp_dir(prefix="httpov-openapi-")
        cls.server = ServerProcess(os.path.join(cls.folder, "data"))

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()
        shutil.rmtree(cls.folder, ignore_errors=True)

    def test_document_covers_every_route(self):
        document = json.loads(urllib.request.urlopen(
            self.server.url + "api/openapi.json", timeout=10).read())
        self.assertEqual(document["openapi"], "3.0.3")
        operations = [(method.upper(), path)
                      for path, item in document["paths"].items()
                      for method in item if method != "parameters"]
        routes = [route for route in httpov.ROUTES
                  if route[1].startswith("/api/") and
                  route[2] != "api_openapi"]
        self.assertEqual(len(operations), len(routes))
        for method, path in operations:
            with self.subTest(operation=(method, path)):
                example = path.replace("{action}", "pause").replace(
                    "{archive}", "0" * 64)
                example = re.sub(r"\{\w+\}", "1", example)
                handler = FakeRequest()
                route, _ = httpov.FarmRequestHandler.find_route(
                    handler, method, example)
                self.assertEqual(route[0], method)

    @needs_tool("st")
    def test_schemathesis_finds_no_failure(self):
        result = subprocess.run(
            ["st", "run", self.server.url + "api/openapi.json", "-H",
             "Authorization: Bearer " + self.server.admin,
             "--max-examples", "15", "--seed", "1", "--checks",
             "not_a_server_error,status_code_conformance,"
             "content_type_conformance,response_schema_conformance",
             "--request-timeout", "10"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            universal_newlines=True, timeout=600)
        self.assertEqual(result.returncode, 0, result.stdout[-3000:])
        with open(self.server.log_path) as source:
            self.assertNotIn("Traceback", source.read())


@needs_povray
class JobPageTest(unittest.TestCase):
    """The job page, its CSRF-protected forms and the live preview."""

    def setUp(self):
        self.folder = make_temp_dir(prefix="httpov-page-")
        self.addCleanup(shutil.rmtree, self.folder, True)
        self.server = ServerProcess(os.path.join(self.folder, "data"))
        self.addCleanup(self.server.stop)
        self.client = self.server.client()
        self.addCleanup(self.client.close)
        query = urllib.parse.urlencode(
            [("name", "<script>x</script> caf\u00e9"), ("slices", "2"),
             ("option", "+W40"), ("option", "+H40")])
        self.job = self.client.upload("/api/jobs?" + query, self.zip())
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor())
        self.opener.open(self.server.url + "?token=" + self.server.admin,
                         timeout=10)

    def zip(self):
        path = os.path.join(self.folder, "job.zip")
        with open(path, "wb") as out:
            out.write(zip_bytes(GOOD_SCENE))
        return path

    def page(self):
        return self.opener.open(self.server.url + "jobs/%d"
                                % self.job["id"], timeout=10).read().decode()

    def test_job_page_shows_job_escaped(self):
        text = self.page()
        self.assertIn("&lt;script&gt;x&lt;/script&gt; caf\u00e9", text)
        self.assertNotIn("<script>", text)
        self.assertEqual(text.count("class='grid'"), 1)
        self.assertEqual(text.count("<a href='/jobs/%d/tasks/"
                                    % self.job["id"]), 2)

    def test_control_needs_csrf_token(self):
        form = urllib.parse.urlencode({"action": "pause"}).encode()
        with self.assertRaises(urllib.error.HTTPError) as caught:
            self.opener.open(self.server.url + "jobs/%d/control"
                             % self.job["id"], data=form, timeout=10)
        self.assertEqual(caught.exception.code, 401)
        csrf = re.search(r"name='csrf' value='(\w+)'", self.page()).group(1)
        form = urllib.parse.urlencode({"action": "pause",
                                       "csrf": csrf}).encode()
        self.opener.open(self.server.url + "jobs/%d/control"
                         % self.job["id"], data=form, timeout=10)
        job = self.client.call("GET", "/api/jobs/%d" % self.job["id"])
        self.assertEqual(job["state"], "paused")
        form = urllib.parse.urlencode({"action": "update", "csrf": csrf,
                                       "priority": "7",
                                       "max_workers": "3"}).encode()
        self.opener.open(self.server.url + "jobs/%d/control"
                         % self.job["id"], data=form, timeout=10)
        job = self.client.call("GET", "/api/jobs/%d" % self.job["id"])
        self.assertEqual((job["priority"], job["max_workers"]), (7, 3))

    def test_tasks_limit(self):
        path = "/api/jobs/%d/tasks" % self.job["id"]
        self.assertEqual(len(self.client.call("GET", path + "?limit=1")
                             ["tasks"]), 1)
        for limit in ("0", "x", "100001"):
            with self.subTest(limit=limit):
                with self.assertRaises(httpov.ApiError) as caught:
                    self.client.call("GET", path + "?limit=" + limit)
                self.assertEqual(caught.exception.status, 400)
                self.assertIn("limit", caught.exception.message)

    def test_task_page_and_api(self):
        task = self.client.call("GET", "/api/jobs/%d/tasks"
                                % self.job["id"])["tasks"][0]
        shown = self.client.call("GET", "/api/tasks/%d" % task["id"])
        self.assertEqual((shown["id"], shown["state"], shown["log"]),
                         (task["id"], "queued", None))
        page = self.opener.open(self.server.url + "jobs/%d/tasks/%d"
                                % (self.job["id"], task["id"]),
                                timeout=10).read().decode()
        self.assertIn("<h1>Task %d</h1>" % task["id"], page)
        self.assertIn("&lt;script&gt;x&lt;/script&gt; caf\u00e9", page)
        self.assertIn("no output recorded", page)
        with self.assertRaises(urllib.error.HTTPError) as caught:
            self.opener.open(self.server.url + "jobs/%d/tasks/%d"
                             % (self.job["id"] + 1, task["id"]), timeout=10)
        self.assertEqual(caught.exception.code, 404)

    def test_session_changes_only_with_csrf_header(self):
        csrf = re.search(r"name='csrf' value='(\w+)'", self.page()).group(1)
        url = self.server.url + "api/jobs/%d/pause" % self.job["id"]
        for headers, expected in (({}, 401),
                                  ({"X-CSRF-Token": "0" * 64}, 401)):
            request = urllib.request.Request(url, b"", headers)
            with self.assertRaises(urllib.error.HTTPError) as caught:
                self.opener.open(request, timeout=10)
            self.assertEqual(caught.exception.code, expected)
        with self.assertRaises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(urllib.request.Request(
                url, b"", {"X-CSRF-Token": csrf}), timeout=10)
        self.assertEqual(caught.exception.code, 401,
                         "the header alone, without the cookie")
        self.opener.open(urllib.request.Request(
            url, b"", {"X-CSRF-Token": csrf}), timeout=10)
        job = self.client.call("GET", "/api/jobs/%d" % self.job["id"])
        self.assertEqual(job["state"], "paused")

    def test_login_link_works_on_any_page(self):
        opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor())
        page_url = self.server.url + "jobs/%d" % self.job["id"]
        response = opener.open(page_url + "?token=" + self.server.admin,
                               timeout=10)
        self.assertEqual(response.geturl(), page_url)
        self.assertIn("<h1>Job %d" % self.job["id"], response.read().decode())

    def test_public_viewer_gets_no_forms(self):
        server = ServerProcess(os.path.join(self.folder, "public"),
                               extra=["--public-status"])
        self.addCleanup(server.stop)
        client = server.client()
        self.addCleanup(client.close)
        job = client.upload("/api/jobs", self.zip())
        page = urllib.request.urlopen(server.url + "jobs/%d" % job["id"],
                                      timeout=10).read().decode()
        self.assertIn("<h1>Job %d" % job["id"], page)
        self.assertNotIn("csrf", page)

    def test_mp4_needs_ffmpeg(self):
        if shutil.which("ffmpeg"):
            self.assertIn("data-mp4", self.page())
        empty = make_temp_dir(prefix="httpov-path-")
        self.addCleanup(shutil.rmtree, empty, True)
        server = ServerProcess(os.path.join(self.folder, "data2"),
                               env=dict(os.environ, PATH=empty))
        self.addCleanup(server.stop)
        client = server.client()
        self.addCleanup(client.close)
        with self.assertRaises(httpov.ApiError) as caught:
            client.call("GET", "/api/jobs/1/animation.mp4")
        self.assertEqual(caught.exception.status, 404)
        self.assertIn("ffmpeg is not installed", str(caught.exception))

    def test_preview_of_frame_in_progress(self):
        worker = httpov.ApiClient(self.server.url, self.server.worker)
        self.addCleanup(worker.close)
        worker_id = worker.call("POST", "/api/workers", {})["worker"]
        with self.assertRaises(httpov.ApiError) as caught:
            self.client.call("GET", "/api/jobs/%d/preview/0.png"
                             % self.job["id"])
        self.assertEqual(caught.exception.status, 404)
        task = worker.call("POST", "/api/claim", {"worker": worker_id})
        task = task["task"]
        self.assertEqual((task["row_first"], task["row_last"]), (1, 32))
        rows = [bytes([200, 100, 50]) * 40] * 32
        image = os.path.join(self.folder, "slice.png")
        httpov.write_png(image, httpov.ImageInfo(40, 32, 8, 2),
                         [(0, row) for row in rows])
        upload = result_zip(os.path.join(self.folder, "r.zip"),
                            {"slice.png": image})
        worker.upload("/api/tasks/%d/result?attempt=%s"
                      % (task["id"], task["attempt"]), upload)
        target = os.path.join(self.folder, "preview.png")
        self.client.download("/api/jobs/%d/preview/0.png" % self.job["id"],
                             target)
        info, pixels = decode_rows(target)
        self.assertEqual((info.width, info.height), (40, 40))
        self.assertEqual(pixels, b"".join(rows) + bytes(8 * 40 * 3))


class PageHelpersTest(unittest.TestCase):

    def test_no_estimate_while_paused(self):
        job = {"started": 100.0, "finished": None, "progress": 0.5,
               "state": "running"}
        self.assertEqual(httpov.job_timing(job, 200.0), (100.0, 100.0))
        job["state"] = "paused"
        self.assertEqual(httpov.job_timing(job, 200.0), (100.0, None))

    def test_form_parts_limited(self):
        folder = make_temp_dir()
        self.addCleanup(shutil.rmtree, folder, True)
        body = b"".join(b"--B\r\nContent-Disposition: form-data; "
                        b"name=\"f%d\"\r\n\r\nx\r\n" % number
                        for number in range(100)) + b"--B--\r\n"
        path = os.path.join(folder, "form")
        with open(path, "wb") as out:
            out.write(body)
        with self.assertRaisesRegex(httpov.UserError, "more than 64 parts"):
            httpov.parse_multipart(path, b"B", os.path.join(folder, "f"),
                                   1000)


def multipart_body(fields, file_name, file_data):
    """Encode a multipart/form-data body; return (content type, bytes)."""
    boundary = "----httpov-test-boundary"
    parts = []
    for name, value in fields.items():
        parts.append(("--%s\r\nContent-Disposition: form-data; name=\"%s\""
                      "\r\n\r\n%s\r\n" % (boundary, name, value)).encode())
    parts.append(("--%s\r\nContent-Disposition: form-data; name=\"file\"; "
                  "filename=\"%s\"\r\nContent-Type: application/octet-"
                  "stream\r\n\r\n" % (boundary, file_name)).encode() +
                 file_data + b"\r\n")
    parts.append(("--%s--\r\n" % boundary).encode())
    return ("multipart/form-data; boundary=%s" % boundary,
            b"".join(parts))


@needs_povray
class SubmitPageTest(unittest.TestCase):

    def setUp(self):
        self.folder = make_temp_dir(prefix="httpov-submit-")
        self.addCleanup(shutil.rmtree, self.folder, True)
        self.server = ServerProcess(os.path.join(self.folder, "data"))
        self.addCleanup(self.server.stop)
        self.client = self.server.client()
        self.addCleanup(self.client.close)
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor())
        self.opener.open(self.server.url + "?token=" + self.server.admin,
                         timeout=10)
        page = self.opener.open(self.server.url + "submit",
                                timeout=10).read().decode()
        self.csrf = re.search(r"name='csrf' value='(\w+)'", page).group(1)

    def post(self, fields, file_name, data):
        content_type, body = multipart_body(fields, file_name, data)
        request = urllib.request.Request(
            self.server.url + "submit", data=body,
            headers={"Content-Type": content_type})
        return self.opener.open(request, timeout=30)

    def test_submit_pov_file(self):
        response = self.post({"csrf": self.csrf, "slices": "2",
                              "povray_options": "+W32 +H40"},
                             "ball.pov", SPHERE_SCENE)
        job_id = int(response.geturl().rstrip("/").rsplit("/", 1)[1])
        job = self.client.call("GET", "/api/jobs/%d" % job_id)
        self.assertEqual(job["name"], "ball")
        self.assertEqual((job["width"], job["height"]), (32, 40))
        self.assertEqual(job["slices_per_frame"], 2)

    def test_submit_zip(self):
        response = self.post({"csrf": self.csrf, "name": "zipped"},
                             "job.zip", zip_bytes(ANIMATED_SCENE))
        job_id = int(response.geturl().rstrip("/").rsplit("/", 1)[1])
        job = self.client.call("GET", "/api/jobs/%d" % job_id)
        self.assertEqual((job["name"], job["frames"]), ("zipped", 10))

    def test_submit_needs_csrf(self):
        with self.assertRaises(urllib.error.HTTPError) as caught:
            self.post({"csrf": "wrong"}, "ball.pov", SPHERE_SCENE)
        self.assertEqual(caught.exception.code, 401)
        self.assertEqual(self.client.call("GET", "/api/jobs")["jobs"], [])

    def send_unauthorized_upload(self, body_start):
        """Send a submit request without a session that declares a 100 MB
        body but sends only ``body_start``, and return the response."""
        connection = socket.create_connection(("127.0.0.1",
                                               self.server.port), 10)
        self.addCleanup(connection.close)
        connection.sendall(b"POST /submit HTTP/1.1\r\nHost: x\r\n"
                           b"Content-Type: multipart/form-data; boundary=B"
                           b"\r\nContent-Length: 100000000\r\n\r\n"
                           + body_start)
        time.sleep(0.5)
        return read_until_closed(connection)

    def test_submit_without_session_reads_no_body(self):
        # The response must not wait for a body that never comes.
        response = self.send_unauthorized_upload(b"--B")
        self.assertTrue(response.startswith("HTTP/1.1 401"), response)
        self.assertIn("log in first", response)

    def test_unread_upload_gets_response(self):
        # 256 KiB of the body reach the server and stay unread.
        response = self.send_unauthorized_upload(b"x" * (256 * 1024))
        self.assertTrue(response.startswith("HTTP/1.1 401"), response)
        self.assertIn("log in first", response)

    def test_submit_bad_scene_explains(self):
        with self.assertRaises(urllib.error.HTTPError) as caught:
            self.post({"csrf": self.csrf}, "notes.txt", b"hello")
        self.assertEqual(caught.exception.code, 400)
        self.assertIn("not a .zip, .pov or .ini",
                      json.loads(caught.exception.read().decode())["error"])


class FakeRequest:
    """Stands in for a request handler where only routing is tested."""


# ---------------------------------------------------------------------------
# 6. Tokens, TLS and the status page login
# ---------------------------------------------------------------------------

def make_certificate(folder):
    """Make a self-signed certificate for 127.0.0.1; return its paths."""
    cert = os.path.join(folder, "cert.pem")
    key = os.path.join(folder, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048",
                    "-nodes", "-keyout", key, "-out", cert, "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext",
                    "subjectAltName=IP:127.0.0.1"],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   check=True)
    return cert, key


@needs_povray
@needs_tool("openssl")
class TlsTest(unittest.TestCase):

    def setUp(self):
        self.assertTrue(shutil.which("openssl"), "openssl is required")
        self.folder = make_temp_dir(prefix="httpov-tls-")
        self.addCleanup(shutil.rmtree, self.folder, True)
        self.cert, key = make_certificate(self.folder)
        self.server = ServerProcess(os.path.join(self.folder, "data"),
                                    extra=["--tls-cert", self.cert,
                                           "--tls-key", key],
                                    scheme="https")
        self.addCleanup(self.server.stop)

    def test_worker_with_cacert_renders(self):
        scene = os.path.join(self.folder, "ball.pov")
        with open(scene, "wb") as out:
            out.write(SPHERE_SCENE)
        result = run_cli("submit", self.server.url, scene, "--token",
                         self.server.admin, "--cacert", self.cert, "--",
                         "+W48", "+H36")
        self.assertEqual(result.returncode, 0, result.stderr)
        job_id = int(result.stdout)
        result = run_cli("work", self.server.url, "--token",
                         self.server.worker, "--cacert", self.cert,
                         "--once", "--workdir",
                         os.path.join(self.folder, "w"), timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        client = httpov.ApiClient(self.server.url, self.server.admin,
                                  cacert=self.cert)
        self.addCleanup(client.close)
        job = wait_for_job(client, job_id, 30)
        self.assertEqual(job["state"], "done", job["error"])

    def test_worker_without_cacert_refuses(self):
        result = run_cli("work", self.server.url, "--token",
                         self.server.worker, "--workdir",
                         os.path.join(self.folder, "w"), timeout=60)
        self.assertEqual(result.returncode, 1)
        self.assertIn("CERTIFICATE_VERIFY_FAILED", result.stderr)
        self.assertIn("--cacert", result.stderr)

    def test_insecure_skips_check(self):
        result = run_cli("status", self.server.url, "--token",
                         self.server.admin, "--insecure")
        self.assertEqual(result.returncode, 0, result.stderr)

    def test_session_cookie_is_secure(self):
        context = ssl.create_default_context(cafile=self.cert)
        connection = http.client.HTTPSConnection(
            "127.0.0.1", self.server.port, context=context, timeout=10)
        self.addCleanup(connection.close)
        connection.request("GET", "/?token=" + self.server.admin)
        response = connection.getresponse()
        response.read()
        self.assertEqual(response.status, 303)
        self.assertIn("; Secure", response.getheader("Set-Cookie"))

    def test_plain_http_to_tls_server_fails(self):
        plain = self.server.url.replace("https://", "http://")
        result = run_cli("status", plain, "--token", self.server.admin)
        self.assertEqual(result.returncode, 1)


class TokenTest(unittest.TestCase):

    def setUp(self):
        self.folder = make_temp_dir(prefix="httpov-token-")
        self.addCleanup(shutil.rmtree, self.folder, True)

    def test_rotate_replaces_tokens_of_running_server(self):
        server = ServerProcess(os.path.join(self.folder, "data"))
        self.addCleanup(server.stop)
        old_client = server.client()
        self.addCleanup(old_client.close)
        old_client.call("GET", "/api/jobs")
        result = run_cli("token", "--rotate", "--data", server.data_dir)
        self.assertEqual(result.returncode, 0, result.stderr)
        lines = dict(line.split() for line in result.stdout.splitlines())
        self.assertNotEqual(lines["admin"], server.admin)
        self.assertNotEqual(lines["worker"], server.worker)
        with self.assertRaises(httpov.ApiError) as caught:
            old_client.call("GET", "/api/jobs")
        self.assertEqual(caught.exception.status, 401)
        new_client = httpov.ApiClient(server.url, lines["admin"])
        self.addCleanup(new_client.close)
        self.assertIn("jobs", new_client.call("GET", "/api/jobs"))

    def test_tokens_never_logged(self):
        server = ServerProcess(os.path.join(self.folder, "data"),
                               extra=["-v"])
        self.addCleanup(server.stop)
        opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor())
        opener.open(server.url + "?token=" + server.admin, timeout=10)
        client = server.client()
        self.addCleanup(client.close)
        client.call("GET", "/api/jobs")
        server.stop()
        with open(server.log_path) as source:
            text = source.read()
        self.assertNotIn(server.admin, text)
        self.assertNotIn(server.worker, text)

    def test_public_status_page(self):
        server = ServerProcess(os.path.join(self.folder, "data"),
                               extra=["--public-status"])
        self.addCleanup(server.stop)
        page = urllib.request.urlopen(server.url, timeout=10)
        self.assertEqual(page.status, 200)
        jobs = urllib.request.urlopen(server.url + "api/jobs", timeout=10)
        self.assertEqual(jobs.status, 200)
        request = urllib.request.Request(server.url + "api/jobs/1/cancel",
                                         data=b"", method="POST")
        with self.assertRaises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=10)
        self.assertEqual(caught.exception.code, 401)


# ---------------------------------------------------------------------------
# 8. Worker containment: render user, limits and the bubblewrap sandbox
# ---------------------------------------------------------------------------

ESCAPE_SCENE = b"""
#fopen Out "../escape.txt" write
#write (Out, "escaped")
#fclose Out
""" + SPHERE_SCENE

READ_HOME_SCENE = b"""
#fopen In "%s" read
#read (In, Secret)
#debug concat("SECRET ", Secret, "\\n")
#fclose In
""" + SPHERE_SCENE


@needs_povray
@needs_tool("bwrap")
class ConnectionLimitTest(unittest.TestCase):
    """Connections over the server's limits get 503 at once, and the
    slots come back when connections close."""

    def start_server(self, total, per_address):
        folder = make_temp_dir(prefix="httpov-limits-")
        self.addCleanup(shutil.rmtree, folder, True)
        self.server = ServerProcess(
            os.path.join(folder, "data"),
            extra=["--max-connections", str(total),
                   "--max-address-connections", str(per_address)])
        self.addCleanup(self.server.stop)

    def idle_connection(self):
        connection = socket.create_connection(("127.0.0.1",
                                               self.server.port), 10)
        self.addCleanup(connection.close)
        return connection

    def get(self):
        """Send one request and return the whole response as text."""
        connection = self.idle_connection()
        connection.sendall(b"GET /api/openapi.json HTTP/1.1\r\nHost: x\r\n"
                           b"Connection: close\r\n\r\n")
        response = read_until_closed(connection)
        connection.close()
        return response

    def wait_for_ok(self):
        deadline = time.time() + 10
        response = self.get()
        while not response.startswith("HTTP/1.1 200") and \
                time.time() < deadline:
            time.sleep(0.2)
            response = self.get()
        return response

    def assert_third_connection_rejected(self, message):
        """Hold two idle connections, check that a request on a third
        gets 503 with ``message``, and that one succeeds once the first
        is closed."""
        first = self.idle_connection()
        self.idle_connection()
        time.sleep(0.5)
        response = self.get()
        self.assertTrue(response.startswith("HTTP/1.1 503"), response)
        self.assertIn("Retry-After: 5", response)
        self.assertIn(message, response)
        first.close()
        response = self.wait_for_ok()
        self.assertTrue(response.startswith("HTTP/1.1 200"), response)

    def test_address_limit(self):
        self.start_server(total=10, per_address=2)
        self.assert_third_connection_rejected(
            "too many connections from 127.0.0.1; try again")

    @needs_tool("openssl")
    def test_tls_client_retries_when_over_limit(self):
        # Before the handshake a 503 cannot be sent, and a TLS error
        # would make a worker give up: the connection is closed instead.
        folder = make_temp_dir(prefix="httpov-limits-")
        self.addCleanup(shutil.rmtree, folder, True)
        cert, key = make_certificate(folder)
        self.server = ServerProcess(
            os.path.join(folder, "data"), scheme="https",
            extra=["--tls-cert", cert, "--tls-key", key,
                   "--max-address-connections", "1"])
        self.addCleanup(self.server.stop)
        occupying = self.idle_connection()
        time.sleep(0.5)
        client = httpov.ApiClient(self.server.url, self.server.admin,
                                  cacert=cert)
        self.addCleanup(client.close)
        with self.assertRaises(httpov.ServerUnreachable):
            client.call("GET", "/api/jobs")
        occupying.close()
        deadline = time.time() + 10
        while True:
            try:
                jobs = client.call("GET", "/api/jobs")
                break
            except httpov.ServerUnreachable:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        self.assertEqual(jobs["jobs"], [])

    def test_reset_connections_logged_briefly(self):
        self.start_server(total=10, per_address=10)
        for _ in range(5):
            connection = socket.create_connection(("127.0.0.1",
                                                   self.server.port), 10)
            connection.sendall(b"GET /api/jobs HTTP/1.1\r\nHost: x\r\n")
            time.sleep(0.2)
            # A zero linger time makes close() reset the connection.
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                  struct.pack("ii", 1, 0))
            connection.close()
        response = self.wait_for_ok()
        self.assertTrue(response.startswith("HTTP/1.1 200"), response)
        with open(self.server.log_path) as log:
            self.assertFalse("Traceback" in log.read(),
                             "a reset connection logged a traceback")

    def test_total_limit(self):
        self.start_server(total=2, per_address=10)
        self.assert_third_connection_rejected(
            '"too many connections; try again"')


class DiskLimitTest(unittest.TestCase):
    """The worker measures a task's files and the disk they are on."""

    def make_folder(self):
        folder = make_temp_dir(prefix="httpov-disk-")
        self.addCleanup(shutil.rmtree, folder, True)
        return folder

    def test_folder_bytes_skips_links(self):
        folder = self.make_folder()
        os.makedirs(os.path.join(folder, "a", "b"))
        with open(os.path.join(folder, "a", "b", "one"), "wb") as out:
            out.write(b"x" * 100000)
        os.symlink("/usr/bin", os.path.join(folder, "linked-folder"))
        os.symlink(sys.executable, os.path.join(folder, "linked-file"))
        counted = httpov.folder_bytes(folder)
        self.assertGreaterEqual(counted, 100000)
        self.assertLess(counted, 1 << 20, "a link was followed")

    @unittest.skipUnless(hasattr(os.stat_result, "st_blocks"),
                         "this system reports no blocks")
    def test_tiny_files_count_as_blocks(self):
        folder = self.make_folder()
        for number in range(200):
            with open(os.path.join(folder, str(number)), "wb") as out:
                out.write(b"x")
        self.assertGreaterEqual(httpov.folder_bytes(folder), 200 * 512)

    def test_limit_broken(self):
        problem = httpov.disk_problem(11 << 20, 100 << 30, 10)
        self.assertIn("past the limit of 10 MiB", problem)

    def test_limit_kept(self):
        self.assertIsNone(httpov.disk_problem(10 << 20, 100 << 30, 10))

    def test_full_disk_stops_large_task(self):
        problem = httpov.disk_problem(
            (httpov.MIN_FREE_DISK_MIB + 1) << 20, 5 << 20, 16384)
        self.assertIn("almost full (5 MiB free)", problem)

    def test_full_disk_spares_small_task(self):
        self.assertIsNone(httpov.disk_problem(1 << 20, 5 << 20, 16384))

    def test_unknown_free_space(self):
        self.assertIsNone(httpov.disk_problem(1 << 30, None, 16384))


class WorkFolderTest(unittest.TestCase):
    """A worker refuses a work folder that others could change."""

    def setUp(self):
        self.folder = make_temp_dir(prefix="httpov-workdir-")
        self.addCleanup(shutil.rmtree, self.folder, True)

    def work(self, workdir):
        return run_cli("work", "http://127.0.0.1:9/", "--token", "x",
                       "--workdir", workdir, "--once", timeout=60)

    def test_linked_subfolder_refused(self):
        workdir = os.path.join(self.folder, "w")
        os.makedirs(workdir)
        target = make_temp_dir(dir=self.folder)
        os.symlink(target, os.path.join(workdir, "tasks"))
        result = self.work(workdir)
        self.assertEqual(result.returncode, 1)
        self.assertIn("is not safe", result.stderr)
        self.assertEqual(stat.S_IMODE(os.stat(target).st_mode), 0o755,
                         "the link target was left alone")

    def test_world_writable_folder_refused(self):
        workdir = os.path.join(self.folder, "w")
        os.makedirs(workdir)
        os.chmod(workdir, 0o777)
        result = self.work(workdir)
        self.assertEqual(result.returncode, 1)
        self.assertIn("others cannot write", result.stderr)

    @unittest.skipUnless(hasattr(os, "geteuid") and os.geteuid() == 0,
                         "needs root to hand a folder to another user")
    def test_folder_of_other_user_refused(self):
        workdir = os.path.join(self.folder, "w")
        os.makedirs(workdir)
        import pwd
        os.chown(workdir, pwd.getpwnam("nobody").pw_uid, -1)
        result = self.work(workdir)
        self.assertEqual(result.returncode, 1)
        self.assertIn("owned by this user", result.stderr)


class SandboxTest(unittest.TestCase):

    def setUp(self):
        self.assertTrue(shutil.which("bwrap"), "bubblewrap is required "
                        "(apt-get install bubblewrap)")
        self.folder = make_temp_dir(prefix="httpov-sandbox-")
        self.addCleanup(shutil.rmtree, self.folder, True)
        self.server = ServerProcess(os.path.join(self.folder, "data"))
        self.addCleanup(self.server.stop)
        self.client = self.server.client()
        self.addCleanup(self.client.close)
        self.home = os.path.join(self.folder, "home")
        os.makedirs(self.home)
        os.chmod(self.home, 0o755)
        self.secret = os.path.join(self.home, "secret.txt")
        with open(self.secret, "w") as out:
            out.write('"top secret"')
        os.chmod(self.secret, 0o644)

    def run_job(self, scene_text, sandbox, *options):
        folder = os.path.join(self.folder, "job-" + sandbox)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "scene.pov"), "wb") as out:
            out.write(scene_text)
        result = run_cli("submit", self.server.url, folder, "--token",
                         self.server.admin, "--", "+W32", "+H24")
        self.assertEqual(result.returncode, 0, result.stderr)
        job_id = int(result.stdout)
        environment = dict(os.environ, HOME=self.home)
        workdir = os.path.join(self.folder, "w-" + sandbox)
        result = run_cli("work", self.server.url, "--token",
                         self.server.worker, "--workdir", workdir,
                         "--sandbox", sandbox, "--once", *options,
                         env=environment, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        tasks = self.client.call("GET", "/api/jobs/%d" % job_id)
        return tasks, workdir

    def escaped_files(self):
        found = []
        for folder, _, names in os.walk(self.folder):
            found.extend(os.path.join(folder, name) for name in names
                         if name == "escape.txt")
        return found

    def test_sandbox_blocks_write_outside_task(self):
        job, _ = self.run_job(ESCAPE_SCENE, "bwrap")
        self.assertEqual(job["tasks_done"], 0)
        self.assertIn("escape.txt", self.task_error(job["id"]))
        self.assertEqual(self.escaped_files(), [])

    def test_sandbox_blocks_reading_home(self):
        scene = READ_HOME_SCENE % self.secret.encode()
        job, _ = self.run_job(scene, "bwrap")
        self.assertEqual(job["tasks_done"], 0)
        error = self.task_error(job["id"])
        self.assertIn("secret.txt", error)

    def test_shared_memory_counts_toward_disk_limit(self):
        # /dev/shm would be memory outside the task folder, where the
        # disk limit does not look.
        job, _ = self.run_job(fill_scene(b"/dev/shm/fill.txt"), "bwrap",
                              "--max-task-disk", "5")
        self.assertEqual(job["tasks_done"], 0)
        self.assertIn("files grew past the limit of 5 MiB",
                      self.task_error(job["id"]))

    def test_without_sandbox_home_is_readable(self):
        # The same scene reads the file when nothing confines it, so the
        # sandbox test above fails if the sandbox stops working.
        scene = READ_HOME_SCENE % self.secret.encode()
        job, _ = self.run_job(scene, "none")
        self.assertEqual(job["tasks_done"], 1)

    def task_error(self, job_id):
        tasks = self.client.call("GET", "/api/jobs/%d/tasks" % job_id)
        return tasks["tasks"][0]["error"] or ""

    def test_render_as_root_refused(self):
        if os.geteuid() != 0:
            self.skipTest("only root is refused")
        environment = dict(os.environ)
        environment.pop("HTTPOV_USER", None)
        result = run_cli("work", self.server.url, "--token",
                         self.server.worker, "--workdir",
                         os.path.join(self.folder, "w-root"),
                         env=environment, timeout=30)
        self.assertEqual(result.returncode, 1)
        self.assertIn("refusing to render as root", result.stderr)


# ---------------------------------------------------------------------------
# Failure injection: killed and stopped workers, a killed server, lost
# responses, outages, concurrent claims, pause and cancel mid-task
# ---------------------------------------------------------------------------

LEASE_SECONDS = 4
SCENE_FILE = "spin.pov"

# Render times of SPHERE_SCENE with one POV-Ray thread, measured with
# POV-Ray 3.7.0.10 on a 2-core machine: QUICK about 0.7 s a frame, MEDIUM
# about 2.3 s and LONG about 4.2 s. MEDIUM and LONG run long enough to
# inject a fault while POV-Ray is still rendering.
QUICK_OPTIONS = ["+W160", "+H120"]
MEDIUM_OPTIONS = ["+W320", "+H240", "+A0.0", "+R9"]
LONG_OPTIONS = ["+W480", "+H360", "+A0.0", "+R9"]

DELIVERY_FAILED = "delivery failed"
# The last line that a worker logs for an attempt that lost its lease:
# its upload got 409, or a heartbeat got 409 and the task was abandoned.
LATE_ATTEMPT_REJECTED = re.compile(
    r"result rejected \(HTTP 409\)|: abandoned \(server: attempt \w+ of "
    r"task \d+ is no longer current")


# ---------------------------------------------------------------------------
# Helpers: processes, servers on a fixed port, a response-losing proxy
# ---------------------------------------------------------------------------

def read_process_stat(pid):
    """Return (state, parent pid) of a process from /proc, or None."""
    try:
        with open("/proc/%d/stat" % pid) as source:
            stat_line = source.read()
    except OSError:
        return None
    fields = stat_line.rsplit(")", 1)[1].split()
    return fields[0], int(fields[1])


def process_alive(pid):
    stat = read_process_stat(pid)
    return stat is not None and stat[0] != "Z"


def child_processes(parent_pid, marker):
    """Return the pids of live children of a process whose command line
    contains ``marker``.

    A worker starts POV-Ray as its child in a new session and passes it
    output paths inside its --workdir, so the workdir finds exactly the
    POV-Ray processes of one worker.
    """
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = read_process_stat(int(entry))
        if stat is None or stat[0] == "Z" or stat[1] != parent_pid:
            continue
        try:
            with open("/proc/%s/cmdline" % entry, "rb") as source:
                command_line = source.read()
        except OSError:
            continue
        if marker.encode() in command_line:
            pids.append(int(entry))
    return pids


def signal_pids(pids, number):
    for pid in pids:
        try:
            os.kill(pid, number)
        except ProcessLookupError:
            pass


class StatusRecordingClient(httpov.ApiClient):
    """An ApiClient that records the HTTP status of every response."""

    def __init__(self, url, token):
        httpov.ApiClient.__init__(self, url, token)
        self.statuses = []

    def connect(self):
        connection = httpov.ApiClient.connect(self)
        if not getattr(connection, "records_statuses", False):
            get_response = connection.getresponse

            def recording_get_response():
                response = get_response()
                self.statuses.append(response.status)
                return response

            connection.getresponse = recording_get_response
            connection.records_statuses = True
        return connection


def read_http_message(reader):
    """Read one HTTP/1.1 request or response with a Content-Length body.

    Returns (head bytes, body bytes), or None at a clean end of stream.
    Every request that ApiClient sends and every response of the httpov
    server has a Content-Length, so chunked bodies are not handled.
    """
    head = reader.readline(65537)
    if not head:
        return None
    length = 0
    while True:
        line = reader.readline(65537)
        if not line:
            raise ConnectionError("connection closed inside an HTTP head")
        head += line
        if line in (b"\r\n", b"\n"):
            break
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    body = reader.read(length) if length else b""
    if len(body) < length:
        raise ConnectionError("connection closed after %d of %d body bytes"
                              % (len(body), length))
    return head, body


class ResponseLosingProxy:
    """A loopback HTTP forwarder that loses one response.

    Every request goes to the server on its own upstream connection. For
    the first ``POST /api/tasks/<id>/result`` the proxy reads the server's
    whole response and then closes the client's connection without
    sending it, as when a network drops the response to a delivered result.
    Each result exchange is recorded as (path, status, JSON body).
    """

    RESULT_PATH = re.compile(r"^/api/tasks/\d+/result\?")

    def __init__(self, upstream_port):
        self.upstream_port = upstream_port
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.url = "http://127.0.0.1:%d/" % self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.result_exchanges = []
        self.lost_one = False
        self.connections = []
        self.closed = False
        threading.Thread(target=self.accept_connections, daemon=True).start()

    def accept_connections(self):
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                if self.closed:
                    connection.close()
                    return
                self.connections.append(connection)
            threading.Thread(target=self.forward, args=(connection,),
                             daemon=True).start()

    def forward(self, connection):
        reader = connection.makefile("rb")
        try:
            while True:
                request = read_http_message(reader)
                if request is None:
                    return
                head, body = request
                method, path = head.decode("latin-1").split(" ")[:2]
                response_head, response_body = self.exchange(head + body)
                if method == "POST" and self.RESULT_PATH.match(path):
                    status = int(response_head.split(b" ", 2)[1])
                    with self.lock:
                        self.result_exchanges.append(
                            (path, status, json.loads(response_body)))
                        lose = not self.lost_one
                        self.lost_one = True
                    if lose:
                        return
                connection.sendall(response_head + response_body)
                if b"\r\nconnection: close" in response_head.lower():
                    return
        except (OSError, ValueError):
            return
        finally:
            reader.close()
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            connection.close()

    def exchange(self, request):
        upstream = socket.create_connection(("127.0.0.1",
                                             self.upstream_port), timeout=60)
        with upstream, upstream.makefile("rb") as reader:
            upstream.sendall(request)
            response = read_http_message(reader)
        if response is None:
            raise ConnectionError("the server closed without a response")
        return response

    def close(self):
        with self.lock:
            self.closed = True
            connections = list(self.connections)
        self.listener.close()
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            connection.close()


# ---------------------------------------------------------------------------
# The shared test fixture
# ---------------------------------------------------------------------------

class FaultTestCase(unittest.TestCase):
    """A fixture that starts servers and workers and stops them all
    after each test, also when the test fails."""

    def setUp(self):
        self.folder = make_temp_dir(prefix="httpov-fault-")
        self.addCleanup(shutil.rmtree, self.folder, True)
        self.scene_dir = os.path.join(self.folder, "scene")
        os.makedirs(self.scene_dir)
        with open(os.path.join(self.scene_dir, SCENE_FILE), "wb") as out:
            out.write(SPHERE_SCENE)
        self.data_dir = os.path.join(self.folder, "data")
        self.server = None
        self.client = None

    def start_server(self, lease=LEASE_SECONDS, port=0):
        """Start (or restart, with the old port) the server on the data
        folder of this test, and point self.client at it."""
        server = ServerProcess(self.data_dir, lease, port=port)
        self.addCleanup(server.stop)
        client = server.client()
        self.addCleanup(client.close)
        self.server, self.client = server, client
        return server

    def start_worker(self, name, url=None):
        """Start a ``work`` subprocess with one thread.

        A ``url`` other than the server's sends the worker's traffic
        elsewhere, as through a proxy.
        """
        target = self.server
        if url is not None:
            target = types.SimpleNamespace(url=url, worker=self.server.worker)
        worker = start_worker(target, self.folder, name)
        self.addCleanup(self.kill_worker, worker, name)
        return worker

    def workdir(self, name):
        return os.path.join(self.folder, name)

    def povray_pids(self, worker, name):
        return child_processes(worker.pid, self.workdir(name) + os.sep)

    def wait_for_povray(self, worker, name, timeout=30):
        """Wait until a worker runs POV-Ray; return POV-Ray's pids."""
        return self.wait_for(lambda: self.povray_pids(worker, name), timeout,
                             "worker %s started no POV-Ray" % name)

    def kill_worker(self, worker, name):
        """Kill a worker and its POV-Ray with SIGKILL, stopped or not."""
        povray = self.povray_pids(worker, name)
        if worker.poll() is None:
            worker.kill()
        worker.wait()
        signal_pids(povray, signal.SIGKILL)

    def worker_log(self, name):
        with open(os.path.join(self.folder, name + ".log"),
                  errors="replace") as source:
            return source.read()

    def wait_for(self, condition, timeout, message, interval=0.1):
        """Poll ``condition`` until it returns a true value; return it."""
        deadline = time.time() + timeout
        while True:
            value = condition()
            if value:
                return value
            if time.time() > deadline:
                self.fail("%s (waited %.0f s)" % (message, timeout))
            time.sleep(interval)

    def wait_for_log(self, name, pattern, timeout, count=1):
        """Wait until a worker's log matches ``pattern`` ``count`` times."""
        regex = re.compile(pattern)
        return self.wait_for(
            lambda: len(regex.findall(self.worker_log(name))) >= count,
            timeout, "worker %s never logged %r %d times; its log:\n%s"
            % (name, pattern, count, self.worker_log(name)[-3000:]))

    # -- the API ------------------------------------------------------------

    def submit(self, povray_options, name="spin"):
        job = httpov.submit_job(
            self.client, os.path.join(self.scene_dir, SCENE_FILE),
            {"name": name}, povray_options)
        return job["id"]

    def job(self, job_id):
        return self.client.call("GET", "/api/jobs/%d" % job_id)

    def tasks(self, job_id):
        return self.client.call("GET", "/api/jobs/%d/tasks"
                                % job_id)["tasks"]

    def workers_by_name(self):
        return {worker["name"]: worker for worker in
                self.client.call("GET", "/api/workers")["workers"]}

    def control(self, job_id, action):
        return self.client.call("POST", "/api/jobs/%d/%s" % (job_id, action))

    def wait_until_requeued(self, job_id, timeout=LEASE_SECONDS + 8):
        """Wait until a one-task job's task is queued again; return it."""
        def requeued():
            task = self.tasks(job_id)[0]
            return task if task["state"] == "queued" else None
        return self.wait_for(requeued, timeout,
                             "the lease of job %d's task never ran out"
                             % job_id, interval=0.2)

    # -- images -------------------------------------------------------------

    def reference_frame(self, povray_options, frame):
        """Render one frame directly with POV-Ray; return the PNG's path."""
        folder = make_temp_dir(prefix="reference-", dir=self.folder)
        frame_options = []
        if any(option.upper().startswith("+KFF")
               for option in povray_options):
            frame_options = ["+SF%d" % frame, "+EF%d" % frame]
        render_plain(self.scene_dir, os.path.join(folder, "reference"),
                     "+I" + SCENE_FILE, *(list(povray_options) +
                                          frame_options))
        names = os.listdir(folder)
        self.assertEqual(len(names), 1, "reference render wrote %s" % names)
        return os.path.join(folder, names[0])

    def assert_frame_matches_reference(self, job_id, frame, povray_options):
        """Fetch a finished frame over the API and compare its pixels
        with a direct POV-Ray render of the same frame."""
        actual = os.path.join(self.folder, "job%d-frame%d.png"
                              % (job_id, frame))
        self.client.download("/api/jobs/%d/frames/%d.png" % (job_id, frame),
                             actual)
        expected = self.reference_frame(povray_options, frame)
        actual_info, actual_rows = decode_rows(actual)
        expected_info, expected_rows = decode_rows(expected)
        self.assertEqual((actual_info.width, actual_info.height),
                         (expected_info.width, expected_info.height))
        if actual_rows != expected_rows:
            differing = sum(1 for a, b in zip(actual_rows, expected_rows)
                            if a != b)
            self.fail("frame %d of job %d differs from a direct POV-Ray "
                      "render in %d of %d bytes"
                      % (frame, job_id, differing, len(expected_rows)))


class PovrayTestCase(FaultTestCase):

    def setUp(self):
        self.assertTrue(POVRAY, "POV-Ray is required (HTTPOV_CI=1)")
        FaultTestCase.setUp(self)


# ---------------------------------------------------------------------------
# 1.-2. A worker dies or stops in the middle of a render
# ---------------------------------------------------------------------------

@needs_povray
class WorkerFaultTest(PovrayTestCase):

    def test_killed_worker_task_leased_again(self):
        self.start_server()
        job_id = self.submit(LONG_OPTIONS)
        alpha = self.start_worker("alpha")
        povray = self.wait_for_povray(alpha, "alpha")
        time.sleep(1.0)
        self.assertEqual(self.tasks(job_id)[0]["state"], "leased")
        self.assertTrue(all(process_alive(pid) for pid in povray),
                        "POV-Ray ended before the kill; use a longer task")

        # Kill the worker first, because a live worker would report POV-Ray's
        # death as a failed attempt, which requeues the task at once.
        alpha.kill()
        alpha.wait()
        signal_pids(povray, signal.SIGKILL)
        self.wait_for(lambda: not any(process_alive(pid) for pid in povray),
                      5, "POV-Ray survived SIGKILL")

        # The last heartbeat came at most 1.2 * lease / 4 = 1.2 s before
        # the kill, so the lease runs at least 2.8 s past it.
        time.sleep(1.5)
        self.assertEqual(self.tasks(job_id)[0]["state"], "leased",
                         "the task was requeued before its lease ran out")
        requeued = self.wait_until_requeued(job_id)
        self.assertIn("lease expired", requeued["error"] or "")
        self.assertEqual(requeued["attempts"], 1)

        self.start_worker("bravo")
        job = wait_for_job(self.client, job_id, 60)
        self.assertEqual(job["state"], "done", job["error"])
        task = self.tasks(job_id)[0]
        self.assertEqual(task["state"], "done")
        self.assertEqual(task["attempts"], 2)
        workers = self.workers_by_name()
        self.assertEqual(task["worker_id"], workers["bravo"]["id"])
        self.assertEqual(workers["bravo"]["tasks_done"], 1)
        self.assertEqual(workers["alpha"]["tasks_done"], 0)
        self.assert_frame_matches_reference(job_id, 0, LONG_OPTIONS)

    def test_stopped_worker_late_result_rejected(self):
        self.start_server()
        job_id = self.submit(LONG_OPTIONS)
        alpha = self.start_worker("alpha")
        povray = self.wait_for_povray(alpha, "alpha")
        time.sleep(1.0)
        os.kill(alpha.pid, signal.SIGSTOP)
        signal_pids(povray, signal.SIGSTOP)
        self.assertEqual(self.tasks(job_id)[0]["state"], "leased")

        self.wait_until_requeued(job_id)
        self.start_worker("bravo")
        job = wait_for_job(self.client, job_id, 60)
        self.assertEqual(job["state"], "done", job["error"])
        frame_path = os.path.join(self.data_dir, "frames", str(job_id),
                                  "0.png")
        with open(frame_path, "rb") as source:
            accepted_bytes = source.read()
        accepted_stat = os.stat(frame_path)

        # POV-Ray resumes alone and finishes (its output fits in the pipe
        # buffer), so the worker wakes up with a finished image and then
        # uploads it late. If the worker's heartbeat thread runs first, the
        # heartbeat gets the 409 and the upload is skipped. The server must
        # reject the attempt either way.
        signal_pids(povray, signal.SIGCONT)
        self.wait_for(lambda: not any(process_alive(pid) for pid in povray),
                      30, "POV-Ray did not finish after SIGCONT")
        os.kill(alpha.pid, signal.SIGCONT)
        self.wait_for_log("alpha", LATE_ATTEMPT_REJECTED.pattern, 30)
        self.wait_for(lambda: not self.povray_pids(alpha, "alpha") and
                      not os.listdir(os.path.join(self.workdir("alpha"),
                                                  "outbox")), 15,
                      "worker alpha kept POV-Ray or its late result")
        self.assertNotIn("result delivered", self.worker_log("alpha"))

        with open(frame_path, "rb") as source:
            self.assertEqual(source.read(), accepted_bytes,
                             "the accepted frame was overwritten")
        final_stat = os.stat(frame_path)
        self.assertEqual((final_stat.st_ino, final_stat.st_mtime_ns),
                         (accepted_stat.st_ino, accepted_stat.st_mtime_ns),
                         "the accepted frame file was replaced")
        tasks = self.tasks(job_id)
        self.assertEqual(len(tasks), 1)
        self.assertEqual(tasks[0]["state"], "done")
        self.assertEqual(tasks[0]["attempts"], 2)
        workers = self.workers_by_name()
        self.assertEqual(tasks[0]["worker_id"], workers["bravo"]["id"])
        self.assertEqual(workers["bravo"]["tasks_done"], 1)
        self.assertEqual(workers["alpha"]["tasks_done"], 0,
                         "the late result was counted as done")
        job = self.job(job_id)
        self.assertEqual((job["state"], job["frames_done"]), ("done", 1))
        self.assert_frame_matches_reference(job_id, 0, LONG_OPTIONS)


# ---------------------------------------------------------------------------
# 3. The server dies with kill -9 and comes back
# ---------------------------------------------------------------------------

@needs_povray
class ServerCrashTest(PovrayTestCase):

    def test_killed_server_restarted_job_completes(self):
        options = MEDIUM_OPTIONS + ["+KFF6"]
        server = self.start_server()
        job_id = self.submit(options)
        alpha = self.start_worker("alpha")
        bravo = self.start_worker("bravo")

        def mid_job():
            job = self.job(job_id)
            tasks = self.tasks(job_id)
            running = [task for task in tasks if task["state"] == "leased"
                       and task["progress"] > 0]
            return running if job["tasks_done"] >= 1 and running else None

        in_flight = self.wait_for(mid_job, 60, "job %d never had a task "
                                  "done and another rendering" % job_id)
        server.kill()
        # A short outage: each kept result is retried within the lease
        # grace that the restarted server grants (see ServerOutageTest).
        time.sleep(1.0)
        self.start_server(port=server.port)
        job = wait_for_job(self.client, job_id, 90)
        self.assertEqual(job["state"], "done", job["error"])

        self.assertIsNone(alpha.poll(), "worker alpha exited")
        self.assertIsNone(bravo.poll(), "worker bravo exited")
        tasks = self.tasks(job_id)
        self.assertEqual([task["state"] for task in tasks], ["done"] * 6)
        attempts = {task["id"]: task["attempts"] for task in tasks}
        for task in in_flight:
            self.assertEqual(attempts[task["id"]], 1,
                             "task %d, rendering during the crash, was "
                             "leased again" % task["id"])
        registered = self.client.call("GET", "/api/workers")["workers"]
        self.assertEqual(sorted(worker["name"] for worker in registered),
                         ["alpha", "bravo"],
                         "a worker registered again after the restart")
        workers = self.workers_by_name()
        self.assertEqual(sum(worker["tasks_done"]
                             for worker in workers.values()), 6,
                         "results accepted: %s" % {
                             name: worker["tasks_done"]
                             for name, worker in workers.items()})
        self.assertEqual(job["frames_done"], 6)
        self.assert_frame_matches_reference(
            job_id, in_flight[0]["frame_first"], options)


# ---------------------------------------------------------------------------
# 4. The response to a delivered result is lost
# ---------------------------------------------------------------------------

@needs_povray
class LostResponseTest(PovrayTestCase):

    def test_lost_result_response_retried(self):
        self.start_server()
        proxy = ResponseLosingProxy(self.server.port)
        self.addCleanup(proxy.close)
        job_id = self.submit(QUICK_OPTIONS)
        self.start_worker("alpha", url=proxy.url)
        job = wait_for_job(self.client, job_id, 60)
        self.assertEqual(job["state"], "done", job["error"])
        # The first upload already finished the job; the retry follows.
        self.wait_for_log("alpha", "result delivered", 15)

        exchanges = proxy.result_exchanges
        self.assertEqual(len(exchanges), 2,
                         "result uploads through the proxy: %s" % exchanges)
        (first_path, first_status, first_body), \
            (second_path, second_status, second_body) = exchanges
        self.assertEqual(second_path, first_path,
                         "the retry names another task or attempt")
        self.assertEqual(first_status, 200)
        self.assertEqual(first_body, {"status": "accepted",
                                      "duplicate": False})
        self.assertEqual(second_status, 200)
        self.assertEqual(second_body, {"status": "accepted",
                                       "duplicate": True})

        log_text = self.worker_log("alpha")
        self.assertEqual(log_text.count(DELIVERY_FAILED), 1, log_text)
        self.assertIn("result delivered", log_text)
        tasks = self.tasks(job_id)
        self.assertEqual(len(tasks), 1)
        self.assertEqual((tasks[0]["state"], tasks[0]["attempts"]),
                         ("done", 1))
        self.assertEqual(self.workers_by_name()["alpha"]["tasks_done"], 1,
                         "the duplicate was counted as a second result")
        self.assert_frame_matches_reference(job_id, 0, QUICK_OPTIONS)


# ---------------------------------------------------------------------------
# 5. The server is unreachable while a finished result waits
# ---------------------------------------------------------------------------

@needs_povray
class ServerOutageTest(PovrayTestCase):

    def render_through_outage(self, lease, failures):
        """Stop the server while a worker renders and restart it once the
        worker has failed ``failures`` times to deliver the result.

        Waits for the job and returns (job id, job).
        """
        server = self.start_server(lease=lease)
        job_id = self.submit(MEDIUM_OPTIONS)
        alpha = self.start_worker("alpha")
        self.wait_for_povray(alpha, "alpha")
        time.sleep(0.5)
        server.stop()
        self.wait_for_log("alpha", DELIVERY_FAILED, 30, count=failures)
        self.assertIn("result kept, retrying", self.worker_log("alpha"))
        self.start_server(lease=lease, port=server.port)
        job = wait_for_job(self.client, job_id, 60)
        self.assertEqual(job["state"], "done", job["error"])
        self.assertIsNone(alpha.poll(), "worker alpha exited")
        self.assert_frame_matches_reference(job_id, 0, MEDIUM_OPTIONS)
        return job_id, job

    def test_kept_result_delivered_after_outage(self):
        # After three failed deliveries the worker waits 3-5 s, and the
        # restarted server grants one lease (6 s here) to running leases.
        job_id, _ = self.render_through_outage(lease=6, failures=3)
        log_text = self.worker_log("alpha")
        self.assertIn("result delivered", log_text)
        self.assertNotIn("result rejected", log_text)
        tasks = self.tasks(job_id)
        self.assertEqual((tasks[0]["state"], tasks[0]["attempts"]),
                         ("done", 1), "the kept result was not the one "
                         "accepted")

    def test_kept_result_survives_long_outage(self):
        # After four failed deliveries the worker waits 6-10 s before the
        # next try, longer than the 4 s lease, and a result in the outbox
        # sends no heartbeats. The lease runs out first, but as no other
        # attempt was issued, the server must still accept the result.
        job_id, _ = self.render_through_outage(lease=LEASE_SECONDS,
                                               failures=4)
        log_text = self.worker_log("alpha")
        rejected = [line for line in log_text.splitlines()
                    if "result rejected" in line]
        self.assertEqual(rejected, [], "the result kept through the outage "
                         "was rejected after the server came back")
        tasks = self.tasks(job_id)
        self.assertEqual(tasks[0]["attempts"], 1,
                         "the task was rendered again after the outage")


# ---------------------------------------------------------------------------
# 6. 100 simulated workers claim at once
# ---------------------------------------------------------------------------

class ConcurrentClaimTest(FaultTestCase):

    WORKERS = 100
    TASKS = 300

    def claim_until_empty(self, number, barrier, results):
        """Register and claim tasks until the server has none left."""
        client = StatusRecordingClient(self.server.url, self.server.worker)
        claimed = []
        outcome = "deadline"
        try:
            barrier.wait(30)
            worker_id = self.call_retrying(
                client, "/api/workers", {"name": "sim-%d" % number})["worker"]
            deadline = time.time() + 90
            while time.time() < deadline:
                claim_response = self.call_retrying(
                    client, "/api/claim", {"worker": worker_id})
                if claim_response["task"] is None:
                    outcome = "empty"
                    break
                claimed.append((claim_response["task"]["id"],
                                claim_response["task"]["attempt"]))
        except Exception as error:
            outcome = "error: %r" % error
        finally:
            client.close()
            results[number] = (claimed, client.statuses, outcome)

    @staticmethod
    def call_retrying(client, path, value):
        """POST JSON, retrying 503 responses and connection errors as
        Worker.call does, but with short waits.

        A connection error is recorded as the status "unreachable".
        """
        for _ in range(50):
            try:
                return client.call("POST", path, value)
            except httpov.ServerUnreachable:
                client.statuses.append("unreachable")
                time.sleep(0.2)
            except httpov.ApiError as error:
                if error.status != 503:
                    raise
                time.sleep(error.retry_after or 0.5)
        raise AssertionError("no response to %s after 50 tries" % path)

    def test_hundred_workers_claim_each_task_once(self):
        # Leases outlast the test, so no task is legitimately leased twice.
        self.start_server(lease=300)
        job_id = self.submit(QUICK_OPTIONS + ["+KFF%d" % self.TASKS])
        task_ids = [task["id"] for task in self.tasks(job_id)]
        self.assertEqual(len(task_ids), self.TASKS)

        barrier = threading.Barrier(self.WORKERS)
        results = {}
        threads = [threading.Thread(target=self.claim_until_empty,
                                    args=(number, barrier, results),
                                    daemon=True)
                   for number in range(self.WORKERS)]
        for thread in threads:
            thread.start()
        deadline = time.time() + 150
        for thread in threads:
            thread.join(max(deadline - time.time(), 0))
        self.assertEqual(len(results), self.WORKERS,
                         "threads still running after 150 s")

        outcomes = {number: result[2] for number, result in results.items()
                    if result[2] != "empty"}
        self.assertEqual(outcomes, {}, "threads that did not end with "
                         "{\"task\": null}")
        statuses = [status for result in results.values()
                    for status in result[1]]
        counts = {status: statuses.count(status) for status in set(statuses)}
        self.assertNotIn(500, counts, "status counts: %s" % counts)
        self.assertLessEqual(set(counts), {200, 201, 503, "unreachable"},
                             "status counts: %s" % counts)
        claimed = [task_id for result in results.values()
                   for task_id, _ in result[0]]
        twice = sorted(set(task_id for task_id in claimed
                           if claimed.count(task_id) > 1))
        self.assertEqual(twice, [], "tasks leased more than once")
        self.assertEqual(sorted(claimed), sorted(task_ids),
                         "claimed tasks differ from the job's tasks")
        tasks = self.tasks(job_id)
        self.assertEqual({(task["state"], task["attempts"])
                          for task in tasks}, {("leased", 1)})

    def test_hundred_workers_connect_without_reset(self):
        # Workers that connect at the same moment, as after a server
        # restart, must all be served. With socketserver's default listen
        # backlog of 5, Linux resets the connections beyond it.
        self.start_server()
        barrier = threading.Barrier(self.WORKERS)
        errors = []

        def register(number):
            client = httpov.ApiClient(self.server.url, self.server.worker)
            try:
                barrier.wait(30)
                client.call("POST", "/api/workers",
                            {"name": "sim-%d" % number})
            except (httpov.ServerUnreachable, httpov.ApiError) as error:
                errors.append(str(error))
            finally:
                client.close()

        threads = [threading.Thread(target=register, args=(number,),
                                    daemon=True)
                   for number in range(self.WORKERS)]
        for thread in threads:
            thread.start()
        deadline = time.time() + 60
        for thread in threads:
            thread.join(max(deadline - time.time(), 0))
        self.assertEqual(len(self.workers_by_name()) + len(errors),
                         self.WORKERS)
        self.assertEqual(len(errors), 0, "%d of %d simultaneous "
                         "registrations failed, the first with: %s"
                         % (len(errors), self.WORKERS, errors[:1]))


# ---------------------------------------------------------------------------
# 7. Pause and cancel while a task renders or uploads
# ---------------------------------------------------------------------------

@needs_povray
class JobControlTest(PovrayTestCase):

    def test_pause_lets_running_task_finish(self):
        options = MEDIUM_OPTIONS + ["+KFF3"]
        self.start_server()
        job_id = self.submit(options)
        alpha = self.start_worker("alpha")
        self.wait_for_povray(alpha, "alpha")
        time.sleep(0.5)
        self.assertEqual(self.control(job_id, "pause")["state"], "paused")

        def first_task_done():
            return self.tasks(job_id)[0]["state"] == "done"

        self.wait_for(first_task_done, 20, "the task running when the job "
                      "was paused was not accepted")
        self.assertNotIn("stopping POV-Ray", self.worker_log("alpha"))
        watch_until = time.time() + 4
        while time.time() < watch_until:
            tasks = self.tasks(job_id)
            self.assertEqual([task["state"] for task in tasks],
                             ["done", "queued", "queued"],
                             "a task was claimed while the job was paused")
            self.assertEqual(sum(task["attempts"] for task in tasks), 1)
            self.assertEqual(self.job(job_id)["state"], "paused")
            time.sleep(0.25)

        self.assertEqual(self.control(job_id, "resume")["state"], "running")
        job = wait_for_job(self.client, job_id, 60)
        self.assertEqual(job["state"], "done", job["error"])
        tasks = self.tasks(job_id)
        self.assertEqual([(task["state"], task["attempts"])
                          for task in tasks], [("done", 1)] * 3)
        self.assert_frame_matches_reference(job_id, 1, options)

    def test_cancel_stops_povray(self):
        self.start_server()
        job_id = self.submit(LONG_OPTIONS + ["+KFF2"])
        alpha = self.start_worker("alpha")
        povray = self.wait_for_povray(alpha, "alpha")
        time.sleep(0.5)
        self.assertEqual(self.control(job_id, "cancel")["state"],
                         "cancelled")
        cancelled_at = time.time()
        self.wait_for_log("alpha", "stopping POV-Ray: the job was cancelled",
                          5)
        self.wait_for(lambda: not any(process_alive(pid) for pid in povray),
                      10, "POV-Ray still runs after the cancel")
        # Uninterrupted, the render would take about 3.5 s more.
        self.assertLess(time.time() - cancelled_at, 2.5,
                        "POV-Ray was not stopped at the next heartbeat")

        # Hold on past the lease, when the abandoned task's lease expires.
        watch_until = time.time() + LEASE_SECONDS + 3
        while time.time() < watch_until:
            job = self.job(job_id)
            self.assertEqual(job["state"], "cancelled")
            self.assertEqual(job["frames_done"], 0)
            self.assertEqual(job["tasks_done"], 0)
            time.sleep(0.25)
        tasks = self.tasks(job_id)
        self.assertEqual(tasks[1]["attempts"], 0,
                         "a task of the cancelled job was claimed")
        log_text = self.worker_log("alpha")
        self.assertNotIn("result delivered", log_text)
        self.assertNotIn(": rendered", log_text)
        self.assertIn("abandoned (the job was cancelled)", log_text)
        frames = os.path.join(self.data_dir, "frames", str(job_id))
        self.assertEqual(os.listdir(frames) if os.path.isdir(frames) else [],
                         [])
        with self.assertRaises(httpov.ApiError) as caught:
            self.client.download("/api/jobs/%d/frames/1.png" % job_id,
                                 os.path.join(self.folder, "none.png"))
        self.assertEqual(caught.exception.status, 404)

    def claim_and_pack(self, client, worker_id, options):
        """Claim a task over the API and render its result zip directly."""
        task = client.call("POST", "/api/claim", {"worker": worker_id})["task"]
        self.assertIsNotNone(task, "no task to claim")
        frame = task["frame_first"]
        png = self.reference_frame(options, frame)
        result = os.path.join(self.folder, "result-%d.zip" % task["id"])
        with zipfile.ZipFile(result, "w") as archive:
            archive.write(png, "frames/%d.png" % frame)
            archive.writestr("log.txt", "rendered by the test\n")
        return task, result

    def result_path(self, task):
        return "/api/tasks/%d/result?attempt=%s" % (task["id"],
                                                    task["attempt"])

    def register(self, client, name):
        return client.call("POST", "/api/workers", {"name": name})["worker"]

    def test_cancel_during_upload_rejected(self):
        self.start_server()
        job_id = self.submit(QUICK_OPTIONS)
        client = StatusRecordingClient(self.server.url, self.server.worker)
        self.addCleanup(client.close)
        worker_id = self.register(client, "api")
        task, result = self.claim_and_pack(client, worker_id, QUICK_OPTIONS)
        self.assertEqual(self.control(job_id, "cancel")["state"],
                         "cancelled")
        with self.assertRaises(httpov.ApiError) as caught:
            client.upload(self.result_path(task), result)
        self.assertEqual(caught.exception.status, 409,
                         caught.exception.message)
        self.assertIn("cancelled", caught.exception.message)
        job = self.job(job_id)
        self.assertEqual((job["state"], job["frames_done"],
                          job["tasks_done"]), ("cancelled", 0, 0))
        self.assertNotEqual(self.tasks(job_id)[0]["state"], "done")
        frames = os.path.join(self.data_dir, "frames", str(job_id))
        self.assertEqual(os.listdir(frames) if os.path.isdir(frames) else [],
                         [])

    def test_pause_during_upload_accepted(self):
        options = QUICK_OPTIONS + ["+KFF2"]
        self.start_server()
        job_id = self.submit(options)
        client = StatusRecordingClient(self.server.url, self.server.worker)
        self.addCleanup(client.close)
        worker_id = self.register(client, "api")
        task, result = self.claim_and_pack(client, worker_id, options)
        self.assertEqual(self.control(job_id, "pause")["state"], "paused")
        upload_response = client.upload(self.result_path(task), result)
        self.assertEqual(client.statuses[-1], 200)
        self.assertEqual(upload_response,
                         {"status": "accepted", "duplicate": False})
        job = self.job(job_id)
        self.assertEqual((job["state"], job["frames_done"]), ("paused", 1))
        self.assertIsNone(client.call("POST", "/api/claim",
                                      {"worker": worker_id})["task"],
                          "a task was handed out while the job was paused")

        self.assertEqual(self.control(job_id, "resume")["state"], "running")
        second, result = self.claim_and_pack(client, worker_id, options)
        self.assertEqual(client.upload(self.result_path(second), result),
                         {"status": "accepted", "duplicate": False})
        job = self.job(job_id)
        self.assertEqual((job["state"], job["frames_done"]), ("done", 2))
        self.assert_frame_matches_reference(job_id, task["frame_first"],
                                            options)


# ---------------------------------------------------------------------------
# 6. The status pages in a real browser
# ---------------------------------------------------------------------------
#
# A small W3C WebDriver client (https://www.w3.org/TR/webdriver2/) drives
# Debian's headless Chromium through chromedriver on 127.0.0.1, with the
# standard library only. The browser log uses chromedriver's own
# POST /session/{id}/se/log, which is not part of W3C.

CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM = "/usr/bin/chromium"

# Key of a web element reference in JSON, fixed by the W3C WebDriver spec.
ELEMENT_KEY = "element-6066-11e4-a52e-4f735466cecf"

# Chromium switches that keep the browser headless, isolated from the
# user's profile and off the network except for loopback. The resolver
# rule makes every host except the loopback ones fail with
# ERR_NAME_NOT_RESOLVED, so even a background feature that the other
# switches miss cannot reach a remote host by name. In Chromium 156 the
# rule also matches IP literals, which is why 127.0.0.1 and [::1] need
# their own EXCLUDE.
CHROMIUM_ARGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--no-proxy-server",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, "
    "EXCLUDE 127.0.0.1, EXCLUDE [::1]",
    "--window-size=1200,900",
)

_STARTED_LINE = re.compile(rb"started successfully on port (\d+)")


class WebDriverError(Exception):
    """Error returned by chromedriver, or a response that is not W3C JSON.

    ``error`` is the W3C error code, such as "no such element", or
    "invalid response" when chromedriver sent no usable JSON.
    """

    def __init__(self, error, message, method="", path=""):
        self.error = error
        self.message = message
        self.method = method
        self.path = path
        # chromedriver's messages usually start with the error code.
        text = message
        if not message.startswith(error):
            text = "{}: {}".format(error, message)
        if method:
            text = "{} {} failed with {}".format(method, path, text)
        super().__init__(text)


class NoSuchElementError(WebDriverError):
    """No element matches a CSS selector."""


class Element(str):
    """Web element reference: the element id string that chromedriver uses.

    It is a ``str`` subclass so that it prints and compares like the id,
    and ``Browser.execute`` can still tell it apart from a plain string.
    """

    def __repr__(self):
        return "Element({})".format(str.__repr__(self))


def _to_json(value):
    """Replace each Element in script arguments by a W3C element reference."""
    if isinstance(value, Element):
        return {ELEMENT_KEY: str(value)}
    if isinstance(value, (list, tuple)):
        return [_to_json(item) for item in value]
    if isinstance(value, dict):
        return {key: _to_json(item) for key, item in value.items()}
    return value


def _from_json(value):
    """Replace each W3C element reference in a script result by an Element."""
    if isinstance(value, dict):
        if len(value) == 1 and ELEMENT_KEY in value:
            return Element(value[ELEMENT_KEY])
        return {key: _from_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_from_json(item) for item in value]
    return value


class Browser:
    """Headless Chromium session, driven through a private chromedriver.

    All timeouts are in seconds, and ``extra_args`` are appended to
    CHROMIUM_ARGS. Every HTTP call to chromedriver times out after
    ``command_timeout``. Its default of 60 s is longer than the default
    page load and script timeouts of 30 s, so chromedriver normally
    reports a slow page itself and the socket timeout only catches a hung
    browser or driver. Keep that order when changing them.

    ``log_path`` is chromedriver's log at level WARNING. Chromium's own
    stderr does not reach it. It is deleted with the temporary folder on
    exit.
    """

    def __init__(self, chromedriver=CHROMEDRIVER, binary=CHROMIUM,
                 extra_args=(), startup_timeout=30.0, command_timeout=60.0,
                 page_load_timeout=30.0, script_timeout=30.0):
        self.chromedriver = chromedriver
        self.binary = binary
        self.extra_args = tuple(extra_args)
        self.startup_timeout = startup_timeout
        self.command_timeout = command_timeout
        self.page_load_timeout = page_load_timeout
        self.script_timeout = script_timeout
        self.port = None
        self.session_id = None
        self.capabilities = None
        self.temp_dir = None
        self.log_path = None
        self._process = None

    # -- Lifecycle --

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc_info):
        self.quit()

    def start(self):
        """Start chromedriver and open a session.

        Raises WebDriverError or TimeoutError, with the tail of the
        chromedriver log, when either step fails. Everything started so
        far is stopped again before the error propagates.
        """
        self.temp_dir = tempfile.mkdtemp(prefix="webdriver-")
        try:
            self._start_driver()
            self._wait_until_ready()
            self._create_session()
        except (WebDriverError, TimeoutError) as error:
            log_tail = self.read_log()[-3000:]
            self.quit()
            error.args = (
                "{}\nLast lines of the chromedriver log:\n{}".format(
                    error, log_tail),
            )
            raise
        except BaseException:
            self.quit()
            raise

    def quit(self):
        """Delete the session, stop chromedriver and remove the temp folder.

        Each step runs even if an earlier one fails, so a hung browser
        still leaves no process or folder behind.
        """
        if self.session_id is not None:
            session_id, self.session_id = self.session_id, None
            try:
                self._request("DELETE", "/session/" + session_id,
                              timeout=10.0)
            except (OSError, WebDriverError, http.client.HTTPException):
                pass
        if self._process is not None:
            self._stop_driver()
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None

    def read_log(self):
        """Return the chromedriver log so far, or "" when there is none."""
        if not self.log_path:
            return ""
        try:
            with open(self.log_path, "rb") as log:
                return log.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def _start_driver(self):
        # --port=0 makes chromedriver pick a free port and print it, which
        # avoids the race of reserving a port here and releasing it.
        self.log_path = os.path.join(self.temp_dir, "chromedriver.log")
        # Chromium 156 keeps its crash report database under
        # $XDG_CONFIG_HOME/chromium regardless of --user-data-dir, so
        # both XDG folders point into the temp folder.
        environment = dict(os.environ)
        environment["XDG_CONFIG_HOME"] = os.path.join(self.temp_dir, "config")
        environment["XDG_CACHE_HOME"] = os.path.join(self.temp_dir, "cache")
        with open(self.log_path, "wb") as log:
            # A new session gives chromedriver its own process group, so
            # _stop_driver can also end the Chromium processes it started.
            self._process = subprocess.Popen(
                [self.chromedriver, "--port=0", "--log-level=WARNING"],
                stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, env=environment,
                start_new_session=True)

        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            with open(self.log_path, "rb") as log:
                match = _STARTED_LINE.search(log.read())
            if match:
                self.port = int(match.group(1))
                return
            if self._process.poll() is not None:
                raise WebDriverError(
                    "session not created",
                    "chromedriver exited with status {} before it "
                    "listened".format(self._process.returncode))
            time.sleep(0.02)
        raise TimeoutError(
            "chromedriver printed no port within {} s".format(
                self.startup_timeout))

    def _wait_until_ready(self):
        deadline = time.monotonic() + self.startup_timeout
        while True:
            try:
                status = self._request("GET", "/status", timeout=5.0)
                if status.get("ready"):
                    return
            except (OSError, http.client.HTTPException):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(
                    "chromedriver on port {} was not ready within {} s"
                    .format(self.port, self.startup_timeout))
            time.sleep(0.05)

    def _create_session(self):
        profile = os.path.join(self.temp_dir, "profile")
        os.mkdir(profile)
        args = list(CHROMIUM_ARGS) + ["--user-data-dir=" + profile]
        args += self.extra_args
        capabilities = {
            "pageLoadStrategy": "normal",
            "timeouts": {
                "implicit": 0,
                "pageLoad": int(self.page_load_timeout * 1000),
                "script": int(self.script_timeout * 1000),
            },
            "goog:chromeOptions": {"binary": self.binary, "args": args},
            # Keeps console messages for console_logs().
            "goog:loggingPrefs": {"browser": "ALL"},
        }
        value = self._request(
            "POST", "/session",
            {"capabilities": {"alwaysMatch": capabilities}},
            timeout=max(self.startup_timeout, 5.0))
        self.session_id = value["sessionId"]
        self.capabilities = value["capabilities"]

    def _stop_driver(self):
        process, self._process = self._process, None
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
        # Chromium processes that outlived chromedriver are still in its
        # process group, whose id is chromedriver's pid.
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    # -- HTTP --

    def _request(self, method, path, body=None, timeout=None):
        """Send one command to chromedriver and return its ``value``.

        Raises WebDriverError for a W3C error, or for a response without
        JSON. Socket errors and timeouts propagate as OSError, and
        malformed HTTP as http.client.HTTPException.
        """
        if timeout is None:
            timeout = self.command_timeout
        connection = http.client.HTTPConnection(
            "127.0.0.1", self.port, timeout=timeout)
        try:
            headers = {}
            payload = None
            if body is not None:
                payload = json.dumps(body).encode("utf-8")
                headers["Content-Type"] = "application/json; charset=utf-8"
            connection.request(method, path, payload, headers)
            response = connection.getresponse()
            raw = response.read()
        finally:
            connection.close()

        try:
            value = json.loads(raw.decode("utf-8"))["value"]
        except (ValueError, KeyError, TypeError):
            raise WebDriverError(
                "invalid response",
                "HTTP {} with body {!r}".format(response.status, raw[:300]),
                method, path)
        if response.status != 200 or (
                isinstance(value, dict) and "error" in value):
            error = value.get("error", "unknown error")
            message = value.get("message", "")
            if error == "no such element":
                raise NoSuchElementError(error, message, method, path)
            raise WebDriverError(error, message, method, path)
        return value

    def _command(self, method, path, body=None):
        if self.session_id is None:
            raise WebDriverError(
                "invalid session id", "the browser is not started",
                method, path)
        return self._request(
            method, "/session/{}{}".format(self.session_id, path), body)

    # -- Navigation --

    def get(self, url):
        """Load ``url`` and wait until the page has loaded.

        Raises WebDriverError when loading fails, for example with
        net::ERR_CONNECTION_REFUSED.

        NOTE: chromedriver 156 raises nothing for a port that Chromium
        blocks as unsafe, such as 9 or 6000. The page then shows
        ERR_UNSAFE_PORT.
        """
        self._command("POST", "/url", {"url": url})

    def current_url(self):
        return self._command("GET", "/url")

    # -- Elements --

    def find(self, css, parent=None):
        """Return the first element that matches ``css``.

        Searches the page, or only inside ``parent`` when it is given.
        Raises NoSuchElementError, naming the selector, if none matches.
        """
        path = "/element"
        if parent is not None:
            path = "/element/{}/element".format(parent)
        try:
            found = self._command(
                "POST", path, {"using": "css selector", "value": css})
        except NoSuchElementError as error:
            raise NoSuchElementError(
                "no such element",
                "no element matches CSS selector {!r} on {}".format(
                    css, self._current_url_or_unknown()),
                error.method, error.path) from None
        return Element(found[ELEMENT_KEY])

    def find_all(self, css, parent=None):
        """Return every element that matches ``css``, possibly none."""
        path = "/elements"
        if parent is not None:
            path = "/element/{}/elements".format(parent)
        found = self._command(
            "POST", path, {"using": "css selector", "value": css})
        return [Element(item[ELEMENT_KEY]) for item in found]

    def _current_url_or_unknown(self):
        try:
            return self.current_url()
        except (OSError, WebDriverError, http.client.HTTPException):
            return "an unknown page"

    def text(self, element):
        """Return the element's rendered text, as innerText shows it."""
        return self._command("GET", "/element/{}/text".format(element))

    def attribute(self, element, name):
        """Return an HTML attribute as a string, or None when it is absent."""
        return self._command(
            "GET", "/element/{}/attribute/{}".format(element, name))

    def click(self, element):
        """Scroll the element into view and click its center."""
        self._command("POST", "/element/{}/click".format(element), {})

    def send_keys(self, element, text):
        """Type ``text`` into the element; for a file input, the text is
        the path of the file to choose."""
        self._command(
            "POST", "/element/{}/value".format(element), {"text": text})

    # -- Scripts, cookies and logs --

    def execute(self, script, *args):
        """Run ``script`` as a function body and return its return value.

        Elements among ``args`` reach the script as DOM nodes, and DOM
        nodes in the result come back as Element. A script that throws
        raises WebDriverError with the error "javascript error".
        """
        value = self._command(
            "POST", "/execute/sync",
            {"script": script, "args": _to_json(list(args))})
        return _from_json(value)

    def wait_for(self, condition, timeout=10.0, message="condition",
                 interval=0.1):
        """Call ``condition`` until it returns a true value, and return it.

        A NoSuchElementError from ``condition`` counts as false, so a
        condition may look up elements that do not exist yet. Raises
        TimeoutError naming ``message`` after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        last_error = None
        while True:
            try:
                result = condition()
                if result:
                    return result
            except NoSuchElementError as error:
                last_error = error
            if time.monotonic() > deadline:
                text = "timed out after {} s waiting for {}".format(
                    timeout, message)
                if last_error is not None:
                    text += " (last error: {})".format(last_error)
                raise TimeoutError(text)
            time.sleep(interval)

    def cookies(self):
        """Return the cookies visible to the current page as W3C dicts.

        Each dict has name, value, path, domain, secure, httpOnly,
        sameSite and, for persistent cookies, expiry.
        """
        return self._command("GET", "/cookie")

    def console_logs(self):
        """Return and clear the browser log entries collected so far.

        Each entry is a dict with level ("SEVERE", "WARNING", "INFO" or
        "DEBUG"), message, source and timestamp in ms. The log includes
        console output, uncaught exceptions, failed requests and Content
        Security Policy violations.
        """
        return self._command("POST", "/se/log", {"type": "browser"})

    def console_errors(self):
        """Return and clear the log entries of level SEVERE.

        Reading the log clears all of it, so the other entries are lost.
        """
        return [entry for entry in self.console_logs()
                if entry.get("level") == "SEVERE"]


@needs_povray
@needs_tool("chromedriver")
class ViewerBrowserTest(unittest.TestCase):
    """Headless Chromium opens the status pages of a farm that renders."""

    def setUp(self):
        self.folder = make_temp_dir(prefix="httpov-browser-")
        self.addCleanup(shutil.rmtree, self.folder, True)
        self.server = ServerProcess(os.path.join(self.folder, "data"))
        self.addCleanup(self.server.stop)
        self.client = self.server.client()
        self.addCleanup(self.client.close)
        self.browser = Browser()
        self.browser.start()
        self.addCleanup(self.browser.quit)

    def text(self, css):
        return self.browser.text(self.browser.find(css))

    def test_watch_and_pause_a_render(self):
        browser = self.browser
        name = "<script>alert(1)</script> \"q\" caf\u00e9 \u6f22"
        query = urllib.parse.urlencode(
            [("name", name), ("slices", "4"), ("frames_per_task", "1"),
             ("option", "+W960"), ("option", "+H720")])
        archive = os.path.join(self.folder, "job.zip")
        packed, _ = httpov.pack_job(os.path.join(EXAMPLES,
                                                 "sliced-animation"))
        shutil.move(packed, archive)
        job = self.client.upload("/api/jobs?" + query, archive)
        worker = start_worker(self.server, self.folder, "w1")
        self.addCleanup(worker.wait, 30)
        self.addCleanup(worker.terminate)

        browser.get(self.server.url + "?token=" + self.server.admin)
        self.assertEqual(browser.current_url(), self.server.url,
                         "the token is dropped from the address bar")
        cookie, = browser.cookies()
        self.assertEqual((cookie["name"], cookie["httpOnly"],
                          cookie["sameSite"]),
                         ("httpov_session", True, "Strict"))
        browser.wait_for(lambda: self.text("#jobs").count(name) == 1,
                         message="the job's name in the jobs table")
        browser.wait_for(lambda: browser.attribute(
            browser.find("#live"), "data-polls") not in (None, "0"),
            message="the dashboard to poll the API")
        self.assertEqual(browser.execute(
            "return document.scripts.length"), 1, "names stay text")
        browser.wait_for(lambda: "busy" in self.text("#workers"),
                         30, "the worker shown busy")

        browser.get(self.server.url + "jobs/%d" % job["id"])
        self.assertIn(name, self.text("h1"))
        browser.execute("window.stayed = true")
        first = self.text("#summary")
        browser.wait_for(lambda: self.text("#summary") != first, 120,
                         "the job's progress to move")
        self.assertTrue(browser.execute("return window.stayed === true"),
                        "progress moved without a reload")
        browser.wait_for(lambda: browser.execute(
            "var i = document.querySelector('#preview img');"
            "return i !== null && i.complete && i.naturalWidth === 960"),
            120, "the preview of the frame in progress to load")
        browser.click(browser.find("button[value='pause']"))
        browser.wait_for(lambda: "paused" in self.text("#summary"), 15,
                         "the page to show the job paused")
        self.assertEqual(self.client.call("GET", "/api/jobs/%d"
                                          % job["id"])["state"], "paused")
        self.assertTrue(browser.execute("return window.stayed === true"),
                        "the pause button used the API, not a new page")
        self.assertEqual(browser.console_errors(), [])

    def test_submit_page_uploads_a_scene(self):
        browser = self.browser
        scene = os.path.join(self.folder, "ball.pov")
        with open(scene, "wb") as out:
            out.write(SPHERE_SCENE)
        browser.get(self.server.url + "?token=" + self.server.admin)
        browser.get(self.server.url + "submit")
        browser.send_keys(browser.find("input[name='file']"), scene)
        browser.send_keys(browser.find("input[name='name']"),
                          "ball \u00e9")
        browser.send_keys(browser.find("input[name='povray_options']"),
                          "+W40 +H30")
        browser.click(browser.find("form#submit button"))
        browser.wait_for(lambda: "/jobs/" in browser.current_url(), 15,
                         "the new job's page")
        job_id = int(browser.current_url().rsplit("/", 1)[1])
        job = self.client.call("GET", "/api/jobs/%d" % job_id)
        self.assertEqual((job["name"], job["width"], job["height"]),
                         ("ball \u00e9", 40, 30))
        browser.get(self.server.url + "submit")
        browser.click(browser.find("form#submit button"))
        browser.wait_for(lambda: "Submit failed: no file chosen" in
                         self.text("#live"), 15, "the error shown")
        self.assertEqual(browser.current_url(), self.server.url + "submit")


# ---------------------------------------------------------------------------
# 7. Old clients: emulators of the HTTPov 0.9 clients, and their tests
# ---------------------------------------------------------------------------
#
# BashClient behaves as the Bash client 1.2 and PythonClient as the Python
# client 2.2.1 did on the wire. They send the same requests with raw, not
# URL-encoded, query strings and read replies line by line by position.
# They fetch the job archive once per stay in a job, run POV-Ray inside the
# job folder and upload results as a zip in a multipart/form-data POST.
# Unlike the old clients, they also check every reply against the protocol
# and keep each mismatch in ``violations``.

LOG = logging.getLogger(__name__)
LOG.addHandler(logging.NullHandler())

# Exit reasons that `LegacyClient.run` returns and stores in `exit_reason`.
EXIT_STOPPED = "stopped"  # stop(), max_cycles, max_sleeps or stop_when
EXIT_ERROR = "error"  # the server sent an error= line
EXIT_NETWORK = "network"  # retries used up, one hello sent
EXIT_RENDER_FAILED = "render-failed"  # abortbatch sent
EXIT_CRASHED = "crashed"  # crash_after_render: died without a post
EXIT_BAD_ARCHIVE = "bad-archive"  # the job zip did not unpack
EXIT_PROTOCOL = "protocol"  # strict mode saw a reply that breaks the spec

_DEFAULT = object()

# Characters that would break a value sent raw in a query string or a
# job name used as a file name and as POV-Ray's +O argument.
_UNSAFE_ID = re.compile(r"[^A-Za-z0-9._~-]")
_UNSAFE_NAME = re.compile(r"[\s/\\?#%&+=\x00-\x1f\x7f]")


class ClientExit(Exception):
    """Raised inside a client to end its run, like the old clients' exit."""

    def __init__(self, reason, detail=""):
        Exception.__init__(self, reason, detail)
        self.reason = reason
        self.detail = detail


class Exchange(object):
    """One HTTP request of a client and the reply it got.

    `command` is the protocol command, or "jobzip" for the archive download
    and "verurl" for the update check. `params` lists the query parameters
    in the order sent. `status` is None and `error` is set when no reply
    came or the client treated the reply as a failure. `lines` contains the
    reply body split at "\\n" without the final empty string.
    """

    __slots__ = ("command", "method", "path", "params", "status",
                 "content_type", "body", "text", "lines", "error", "time")

    def __init__(self, command, method, path, params):
        self.command = command
        self.method = method
        self.path = path
        self.params = list(params)
        self.status = None
        self.content_type = None
        self.body = b""
        self.text = ""
        self.lines = []
        self.error = None
        self.time = time.time()

    @property
    def keys(self):
        """Keys of the reply lines, in order ("" for a line without =)."""
        return [line.partition("=")[0] if "=" in line else ""
                for line in self.lines]

    def value(self, key):
        """Return the value of the first reply line with `key`, or None."""
        for line in self.lines:
            name, sep, value = line.partition("=")
            if sep and name == key:
                return value
        return None

    def param(self, key):
        """Return the value of query parameter `key` as sent, or None."""
        for name, value in self.params:
            if name == key:
                return value
        return None

    def __repr__(self):
        return "Exchange(%s %s -> %s %r%s)" % (
            self.method, self.path, self.status, self.lines,
            " error=%s" % self.error if self.error else "")


class Upload(object):
    """One result zip a client posted with postbatch."""

    __slots__ = ("filename", "data", "job", "batch", "reply")

    def __init__(self, filename, data, job, batch):
        self.filename = filename
        self.data = data
        self.job = job
        self.batch = batch
        self.reply = None  # value of the status= line, once posted

    def names(self):
        """Return the member names of the zip, in archive order."""
        with zipfile.ZipFile(io.BytesIO(self.data)) as archive:
            return archive.namelist()

    def read(self, name):
        """Return the bytes of member `name`."""
        with zipfile.ZipFile(io.BytesIO(self.data)) as archive:
            return archive.read(name)

    def __repr__(self):
        return "Upload(%s, job=%s, batch=%s, %d bytes)" % (
            self.filename, self.job, self.batch, len(self.data))


class RenderRun(object):
    """One POV-Ray run: arguments, folder, exit code and console output."""

    __slots__ = ("args", "cwd", "returncode", "output", "files", "failure")

    def __init__(self, args, cwd):
        self.args = list(args)
        self.cwd = cwd
        self.returncode = None
        self.output = b""
        self.files = []  # output files found, in frame order
        self.failure = None  # why the render counts as failed, or None

    def __repr__(self):
        return "RenderRun(%s, rc=%s, failure=%s)" % (
            " ".join(self.args), self.returncode, self.failure)


class Job(object):
    """The job a getjob reply handed out."""

    __slots__ = ("id", "name", "frames")

    def __init__(self, job_id, name, frames):
        self.id = job_id
        self.name = name
        self.frames = frames


class Batch(object):
    """The work a getbatch reply handed out."""

    __slots__ = ("id", "startframe", "stopframe", "slice", "startrow",
                 "endrow")

    def __init__(self, batch_id, startframe, stopframe, slice_number=None,
                 startrow=None, endrow=None):
        self.id = batch_id
        self.startframe = startframe
        self.stopframe = stopframe
        self.slice = slice_number
        self.startrow = startrow
        self.endrow = endrow

    @property
    def is_slice(self):
        return self.slice is not None


def check_loopback(host):
    """Raise ValueError unless `host` names a loopback address."""
    bare = host.strip("[]")
    if bare == "localhost":
        return
    try:
        address = ipaddress.ip_address(bare)
    except ValueError:
        raise ValueError("host %r is not a loopback address; the legacy "
                         "client emulators only talk to 127.0.0.0/8 or ::1"
                         % host)
    if not address.is_loopback:
        raise ValueError("host %r is not a loopback address; the legacy "
                         "client emulators only talk to 127.0.0.0/8 or ::1"
                         % host)


def split_host_port(netloc, default_port=80):
    """Split "host", "host:port" or "[v6]:port" into (host, port)."""
    if netloc.startswith("["):
        host, _, rest = netloc[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif netloc.count(":") == 1:
        host, _, port = netloc.partition(":")
    else:
        host, port = netloc, ""
    if not host:
        raise ValueError("missing host in server setting %r" % netloc)
    if port and not port.isdigit():
        raise ValueError("invalid port in server setting %r" % netloc)
    return host, int(port) if port else default_port


def feature_level(version):
    """Return the feature level of a client version as a tuple of ints.

    The part before the first dot is the client family, the rest is the
    level: "2.2.1" has level (2, 1) and "1.2" has level (2,).
    """
    _, _, rest = (version or "").partition(".")
    level = []
    for part in rest.split(".") if rest else []:
        level.append(int(part) if part.isdigit() else 0)
    return tuple(level)


def encode_multipart(field, filename, data, content_type):
    """Return (body, Content-Type header) of a one-file form upload."""
    boundary = "----legacy-client-%016x" % random.getrandbits(64)
    head = ('--%s\r\nContent-Disposition: form-data; name="%s"; '
            'filename="%s"\r\nContent-Type: %s\r\n\r\n'
            % (boundary, field, filename, content_type))
    tail = "\r\n--%s--\r\n" % boundary
    body = head.encode("utf-8") + data + tail.encode("ascii")
    return body, "multipart/form-data; boundary=%s" % boundary


class LegacyClient(object):
    """Shared loop of the old clients. Use BashClient or PythonClient.

    Arguments:
      server: where httpov.php lives, in the form each subclass states.
      hostname, cid: sent as client=<hostname>:<cid>; cid defaults to the
        process id, so give clients in one test process distinct cids.
      version: sent as version=; None omits the parameter.
      group: sent as cgroup= when set.
      povray: the POV-Ray command, a string split like a shell would or a
        list of arguments.
      workdir: folder for the job archive, the job folder and temporary
        files; a new temporary folder when None.
      verurl: update-check URL, called once at the start of run(); None
        skips the check. It must be a loopback URL.
      sleep_first, sleep_cap: the wait for work in seconds, doubled after
        each command=sleep up to the cap (old clients: 2 s and 300 s).
      retries, retry_first: network retries, waiting retry_first, then
        twice as long each time (old clients: 10 retries from 1 s).
      time_scale: factor on every sleep and retry wait actually waited;
        `sleeps` and `retry_waits` store the unscaled seconds.
      active_interval: seconds between active pings while POV-Ray runs
        (old clients: about 60 s); None sends no pings.
      max_cycles: stop before the getjob or getbatch request that would
        exceed this count.
      max_sleeps: stop after this many command=sleep replies in a row.
      stop_when: callable taking the client, checked before each getjob
        and getbatch request; a true result stops the client.
      crash_after_render: die after POV-Ray finishes, posting nothing.
      fail_render: skip POV-Ray, count the batch as failed and send
        abortbatch.
      render_delay: extra seconds a render takes after POV-Ray ends,
        with active pings going on.
      render_timeout: seconds after which POV-Ray is killed and the
        render counts as failed.
      upload_filter: callable (filename, data) -> (filename, data) that
        may change a result zip before it is posted.
      strict: end the run at the first protocol violation.
      timeout: socket timeout of each HTTP request, in seconds.
      allow_remote: skip the loopback check of server and verurl.
    """

    family = None
    default_version = None
    adds_png_option = False  # Python client: +FN on the POV-Ray command
    writes_batchreport = False  # Python client: batchreport.txt in frames
    zip_folder_entry = False  # Bash client: zip -r stores the folder itself
    fails_on_http_error = False  # Python client: 4xx/5xx is a failure
    user_agent = None

    def __init__(self, server, hostname=None, cid=None, version=_DEFAULT,
                 group=None, povray="povray", workdir=None, verurl=None,
                 sleep_first=2.0, sleep_cap=300.0, retries=10,
                 retry_first=1.0, time_scale=1.0, active_interval=60.0,
                 max_cycles=None, max_sleeps=None, stop_when=None,
                 crash_after_render=False, fail_render=False,
                 render_delay=0.0, render_timeout=600.0,
                 upload_filter=None, strict=True, timeout=30.0,
                 allow_remote=False):
        self.server = server
        self.host, self.port, self.base_path = self._parse_server(server)
        if not allow_remote:
            check_loopback(self.host)
            if verurl:
                check_loopback(urllib.parse.urlsplit(verurl).hostname or "")
        self.hostname = hostname or socket.gethostname()
        self.cid = os.getpid() if cid is None else cid
        self.version = (self.default_version if version is _DEFAULT
                        else version)
        self.group = group
        if isinstance(povray, str):
            povray = shlex.split(povray)
        self.povray = list(povray)
        self.workdir = workdir or tempfile.mkdtemp(prefix="legacy-client-")
        self.verurl = verurl
        self.sleep_first = sleep_first
        self.sleep_cap = sleep_cap
        self.retries = retries
        self.retry_first = retry_first
        self.time_scale = time_scale
        self.active_interval = active_interval
        self.max_cycles = max_cycles
        self.max_sleeps = max_sleeps
        self.stop_when = stop_when
        self.crash_after_render = crash_after_render
        self.fail_render = fail_render
        self.render_delay = render_delay
        self.render_timeout = render_timeout
        self.upload_filter = upload_filter
        self.strict = strict
        self.timeout = timeout
        self.allow_remote = allow_remote


        # What the run did, for tests to assert on.
        self.transcript = []  # Exchange, one per HTTP attempt
        self.output = []  # lines the old client would have printed
        self.violations = []  # replies that break the protocol
        self.uploads = []  # Upload, one per postbatch
        self.renders = []  # RenderRun, one per POV-Ray run
        self.sleeps = []  # seconds of each wait for work (unscaled)
        self.retry_waits = []  # seconds of each network retry (unscaled)
        self.latest_version = None  # clientver= of the update check
        self.exit_reason = None
        self.exit_detail = ""
        self.cycles = 0
        self.consecutive_sleeps = 0
        self.batches_done = 0
        self.job = None  # Job of the current stay, or None
        self.batch = None  # Batch being rendered, or None

        self._next_sleep = sleep_first
        self._stop_event = threading.Event()
        self._thread = None
        self._lock = threading.Lock()

    # -- public interface ------------------------------------------------

    @property
    def client_id(self):
        """The client= value: "<hostname>:<cid>"."""
        return "%s:%s" % (self.hostname, self.cid)

    @property
    def endpoint_path(self):
        """Path of httpov.php on the server, without the query string."""
        return self.base_path + "/httpov.php"

    def job_archive_path(self, name):
        """Path of the job archive `name` on the server."""
        return self.base_path + "/jobs/" + name + ".zip"

    def run(self):
        """Run the client loop until it exits, and return the exit reason.

        The loop is the old clients': optional update check, hello, then
        getjob and, inside a job, getbatch until the server sends the
        client away. It ends on an error= line, a failed render, used-up
        network retries, a crash knob, a strict protocol violation or a
        stop condition; it never raises for those.
        """
        try:
            if self.verurl:
                self.check_update()
            self._hello()
            while True:
                job = self._getjob()
                if job is not None:
                    self._stay_in_job(job)
        except ClientExit as exit_:
            self.exit_reason = exit_.reason
            self.exit_detail = exit_.detail
        LOG.info("%s %s exited: %s %s", self.__class__.__name__,
                 self.client_id, self.exit_reason, self.exit_detail)
        return self.exit_reason

    def start(self):
        """Start run() in a daemon thread and return the thread."""
        self._thread = threading.Thread(target=self.run,
                                        name="legacy-" + self.client_id)
        self._thread.daemon = True
        self._thread.start()
        return self._thread

    def stop(self):
        """Ask a running client to stop; a running POV-Ray is killed."""
        self._stop_event.set()

    def join(self, timeout=None):
        """Wait for the thread of start() to end; return True if it did."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def check_update(self):
        """Call `verurl?version=<v>` once and return its clientver= value.

        Returns None when verurl is unset, the request failed or the reply
        has no clientver= line. The value is also stored in
        `latest_version`, and a notice is printed when it differs from the
        client's version.
        """
        if not self.verurl:
            return None
        parts = urllib.parse.urlsplit(self.verurl)
        host, port = split_host_port(parts.netloc)
        path = parts.path or "/"
        params = [("version", self.version or "")]
        exchange = self._http(
            "verurl", "GET", host, port,
            path + "?" + self._query_string(params), params)
        if exchange.error:
            self._print("Update check failed: %s" % exchange.error)
            return None
        latest = exchange.value("clientver")
        self.latest_version = latest
        if latest and latest != self.version:
            self._print("A newer client version is available: %s" % latest)
        return latest

    def send(self, command, **params):
        """Send one protocol request (no retries) and return the Exchange.

        For tests that need a request the loop would not make, such as
        `abort`. Parameters go before client, version and cgroup.
        """
        return self._request_once(command, sorted(params.items()))

    def requests(self, command=None):
        """Return the exchanges of `command` (all when None), in order."""
        return [exchange for exchange in self.transcript
                if command is None or exchange.command == command]

    # -- request building and sending ------------------------------------

    def _parse_server(self, server):
        raise NotImplementedError

    def _standard_params(self):
        params = [("client", self.client_id)]
        if self.version is not None:
            params.append(("version", self.version))
        if self.group:
            params.append(("cgroup", self.group))
        return params

    @staticmethod
    def _query_string(params):
        # Old clients paste values in as they are, with no URL encoding.
        return "&".join("%s=%s" % (key, value) for key, value in params)

    def _protocol_path(self, command, params):
        all_params = ([("command", command)] + list(params)
                      + self._standard_params())
        return (self.endpoint_path + "?" + self._query_string(all_params),
                all_params)

    def _http(self, command, method, host, port, path, params, body=None,
              content_type=None):
        exchange = Exchange(command, method, path, params)
        headers = {"User-Agent": self.user_agent, "Accept": "*/*"}
        if content_type:
            headers["Content-Type"] = content_type
        connection = http.client.HTTPConnection(host, port,
                                                timeout=self.timeout)
        try:
            # skip_accept_encoding keeps the request as plain as curl's.
            connection.putrequest(method, path, skip_accept_encoding=True)
            for name, value in headers.items():
                connection.putheader(name, value)
            if body is not None:
                connection.putheader("Content-Length", str(len(body)))
            connection.endheaders(body)
            response = connection.getresponse()
            exchange.status = response.status
            exchange.content_type = response.getheader("Content-Type")
            exchange.body = response.read()
        except (OSError, http.client.HTTPException) as error:
            exchange.error = "%s: %s" % (type(error).__name__, error)
        finally:
            connection.close()
        if exchange.error is None:
            exchange.text = exchange.body.decode("utf-8", "replace")
            exchange.lines = exchange.text.split("\n")
            if exchange.lines and exchange.lines[-1] == "":
                exchange.lines.pop()
            if self.fails_on_http_error and exchange.status >= 400:
                exchange.error = "HTTP status %d" % exchange.status
        with self._lock:
            self.transcript.append(exchange)
        LOG.debug("%s", exchange)
        return exchange

    def _request_once(self, command, params=(), body=None,
                      content_type=None):
        path, all_params = self._protocol_path(command, params)
        method = "GET" if body is None else "POST"
        return self._http(command, method, self.host, self.port, path,
                          all_params, body, content_type)

    def _request(self, command, params=(), body=None, content_type=None):
        """Send a request with the old clients' retries; return a reply.

        After the last retry fails the client sends one hello and exits.
        """
        attempt = 0
        while True:
            exchange = self._request_once(command, params, body,
                                          content_type)
            if exchange.error is None:
                return exchange
            if attempt >= self.retries:
                self._print("Giving up after %d retries: %s"
                            % (self.retries, exchange.error))
                self._request_once("hello")
                raise ClientExit(EXIT_NETWORK, exchange.error)
            wait = self.retry_first * 2 ** attempt
            self.retry_waits.append(wait)
            self._print("Network error (%s), retrying in %g s"
                        % (exchange.error, wait))
            self._wait(wait)
            attempt += 1

    # -- reply handling --------------------------------------------------

    def _print(self, text):
        self.output.append(text)
        LOG.info("%s: %s", self.client_id, text)

    def _violation(self, exchange, text):
        self._record_violation("%s reply %r: %s" % (
            exchange.command, exchange.lines, text))

    def _record_violation(self, detail):
        self.violations.append(detail)
        LOG.warning("%s: protocol violation: %s", self.client_id, detail)
        if self.strict:
            raise ClientExit(EXIT_PROTOCOL, detail)

    def _read_reply(self, exchange):
        """Check the reply's framing, print message= lines, obey error=."""
        if exchange.content_type is None or not exchange.content_type \
                .split(";")[0].strip().lower() == "text/plain":
            self._violation(exchange, "Content-Type is %r, expected "
                            "text/plain" % exchange.content_type)
        if exchange.text and not exchange.text.endswith("\n"):
            self._violation(exchange, "last line does not end in \\n")
        if "\r" in exchange.text:
            self._violation(exchange, "reply contains \\r")
        for line in exchange.lines:
            if line.startswith("error="):
                self._print(line[len("error="):])
                raise ClientExit(EXIT_ERROR, line)
        for line in exchange.lines:
            if line.startswith("message="):
                self._print(line[len("message="):])
        for line in exchange.lines:
            if "=" not in line:
                self._violation(exchange, "line %r is not key=value" % line)

    def _value_at(self, exchange, position, key):
        """Return the value of reply line `position` (0-based).

        Like the old clients, this ignores the key written on the line; a
        different key is recorded as a violation. A missing line reads as
        an empty value.
        """
        if position >= len(exchange.lines):
            self._violation(exchange, "line %d (%s=) is missing"
                            % (position + 1, key))
            return ""
        name, _, value = exchange.lines[position].partition("=")
        if name != key:
            self._violation(exchange, "line %d is %s=, expected %s="
                            % (position + 1, name, key))
        return value

    def _expect_keys(self, exchange, keys, optional_tail=()):
        actual = exchange.keys
        if actual != list(keys) and actual != list(keys) + list(
                optional_tail):
            self._violation(exchange, "lines are %s, expected %s%s" % (
                actual, list(keys),
                " (+ %s)" % list(optional_tail) if optional_tail else ""))

    def _int_at(self, exchange, position, key, minimum=0):
        text = self._value_at(exchange, position, key)
        if not text.isdigit() or int(text) < minimum:
            self._violation(exchange, "%s=%r is not an integer >= %d"
                            % (key, text, minimum))
            return minimum
        return int(text)

    def _id_at(self, exchange, position, key):
        text = self._value_at(exchange, position, key)
        if not text or _UNSAFE_ID.search(text):
            self._violation(exchange, "%s=%r is empty or has characters "
                            "that break a raw query string" % (key, text))
        return text

    @property
    def _gated(self):
        """Tell whether the server replies to every request with the
        version gate (no version, or family 0)."""
        return self.version is None or self.version.split(".")[0] == "0"

    @property
    def _below_level_2(self):
        return feature_level(self.version) < (2,)

    # -- the loop --------------------------------------------------------

    def _check_stop(self):
        if self._stop_event.is_set():
            raise ClientExit(EXIT_STOPPED, "stop() called")
        if self.max_cycles is not None and self.cycles >= self.max_cycles:
            raise ClientExit(EXIT_STOPPED, "max_cycles reached")
        if (self.max_sleeps is not None
                and self.consecutive_sleeps >= self.max_sleeps):
            raise ClientExit(EXIT_STOPPED, "max_sleeps reached")
        if self.stop_when is not None and self.stop_when(self):
            raise ClientExit(EXIT_STOPPED, "stop_when returned true")
        self.cycles += 1

    def _wait(self, seconds):
        if self._stop_event.wait(seconds * self.time_scale):
            raise ClientExit(EXIT_STOPPED, "stop() called")

    def _sleep_for_work(self):
        seconds = self._next_sleep
        self.sleeps.append(seconds)
        self.consecutive_sleeps += 1
        self._wait(seconds)
        self._next_sleep = min(self._next_sleep * 2, self.sleep_cap)

    def _hello(self):
        exchange = self._request("hello")
        self._read_reply(exchange)
        if self._gated:
            self._expect_keys(exchange, ["command", "message"])
        else:
            self._expect_keys(exchange, ["message"])

    def _getjob(self):
        """Ask for a job; return it, or None after sleeping."""
        self._check_stop()
        exchange = self._request("getjob")
        self._read_reply(exchange)
        command = self._value_at(exchange, 0, "command")
        if self._gated:
            self._expect_keys(exchange, ["command", "message"])
            if command != "sleep":
                self._violation(exchange, "a client without a version or "
                                "of family 0 must get command=sleep")
        if command == "getbatch":
            tail = ["message"] if self._below_level_2 else []
            self._expect_keys(exchange,
                              ["command", "job", "name", "frames"] + tail)
            job_id = self._id_at(exchange, 1, "job")
            name = self._value_at(exchange, 2, "name")
            if (not name or name.startswith(".")
                    or _UNSAFE_NAME.search(name)):
                self._violation(exchange, "job name %r is not a safe file "
                                "name" % name)
            frames = self._int_at(exchange, 3, "frames", minimum=1)
            return Job(job_id, name, frames)
        if command == "sleep":
            if not self._gated:
                tail = ["message"] if self._below_level_2 else []
                self._expect_keys(exchange, ["command"], tail)
            self._sleep_for_work()
            return None
        self._violation(exchange, "getjob reply command=%r is neither "
                        "getbatch nor sleep" % command)
        self._sleep_for_work()
        return None

    def _stay_in_job(self, job):
        """Render batches of `job` until the server sends the client away."""
        self.job = job
        self._fetch_job(job)
        while True:
            self._check_stop()
            exchange = self._request("getbatch", [("job", job.id)])
            self._read_reply(exchange)
            command = self._value_at(exchange, 0, "command")
            if command == "render":
                batch = self._parse_batch(exchange, job)
                self._next_sleep = self.sleep_first
                self.consecutive_sleeps = 0
                self._render_batch(job, batch)
            elif command == "sleep":
                self._expect_keys(exchange, ["command"])
                self._sleep_for_work()
            elif command == "getjob":
                self._expect_keys(exchange, ["command"])
                self._leave_job(job)
                return
            else:
                self._violation(exchange, "getbatch reply command=%r is not "
                                "render, sleep or getjob" % command)
                self._sleep_for_work()

    def _parse_batch(self, exchange, job):
        frame_keys = ["command", "batch", "startframe", "stopframe"]
        slice_keys = ["slice", "startrow", "endrow"]
        sliced = len(exchange.lines) > len(frame_keys)
        self._expect_keys(exchange,
                          frame_keys + slice_keys if sliced else frame_keys)
        batch_id = self._id_at(exchange, 1, "batch")
        start = self._int_at(exchange, 2, "startframe")
        stop = self._int_at(exchange, 3, "stopframe")
        if not start <= stop < job.frames:
            self._violation(exchange, "frames %d..%d are not within "
                            "0..%d" % (start, stop, job.frames - 1))
        if not sliced:
            return Batch(batch_id, start, stop)
        slice_number = self._int_at(exchange, 4, "slice")
        startrow = self._int_at(exchange, 5, "startrow", minimum=1)
        endrow = self._int_at(exchange, 6, "endrow", minimum=1)
        if startrow > endrow:
            self._violation(exchange, "startrow %d is after endrow %d"
                            % (startrow, endrow))
        if start != stop:
            self._violation(exchange, "a slice covers frames %d..%d, "
                            "expected one frame" % (start, stop))
        return Batch(batch_id, start, stop, slice_number, startrow, endrow)

    # -- job archive -----------------------------------------------------

    def _job_zip(self, job):
        return os.path.join(self.workdir, job.name + ".zip")

    def _job_folder(self, job):
        return os.path.join(self.workdir, job.name)

    def _fetch_job(self, job):
        """Download and unpack the job archive, once per stay in a job."""
        zip_path = self._job_zip(job)
        # Files left by an earlier run in the same workdir are stale.
        shutil.rmtree(self._job_folder(job), ignore_errors=True)
        exchange = self._download(job)
        with open(zip_path, "wb") as stream:
            stream.write(exchange.body)
        try:
            with zipfile.ZipFile(zip_path) as archive:
                self._check_archive(exchange, archive, job)
                archive.extractall(self.workdir)
        except zipfile.BadZipfile as error:
            self._print("Cannot unpack %s.zip: %s" % (job.name, error))
            raise ClientExit(EXIT_BAD_ARCHIVE, str(error))
        if not os.path.isfile(os.path.join(self._job_folder(job),
                                           "pov.ini")):
            self._print("%s.zip has no %s/pov.ini" % (job.name, job.name))
            raise ClientExit(EXIT_BAD_ARCHIVE, "pov.ini missing")

    def _download(self, job):
        path = self.job_archive_path(job.name)
        attempt = 0
        while True:
            exchange = self._http("jobzip", "GET", self.host, self.port,
                                  path, [])
            if exchange.error is None:
                return exchange
            if attempt >= self.retries:
                self._request_once("hello")
                raise ClientExit(EXIT_NETWORK, exchange.error)
            wait = self.retry_first * 2 ** attempt
            self.retry_waits.append(wait)
            self._wait(wait)
            attempt += 1

    def _check_archive(self, exchange, archive, job):
        prefix = job.name + "/"
        for name in archive.namelist():
            parts = name.split("/")
            if name.startswith("/") or ".." in parts or "\\" in name:
                self._violation(exchange, "archive member %r escapes the "
                                "job folder" % name)
                raise ClientExit(EXIT_BAD_ARCHIVE, name)
            if not (name + "/").startswith(prefix):
                self._violation(exchange, "archive member %r is outside "
                                "%s" % (name, prefix))
        if prefix + "pov.ini" not in archive.namelist():
            self._violation(exchange, "archive has no %spov.ini" % prefix)

    def _leave_job(self, job):
        zip_path = self._job_zip(job)
        if os.path.exists(zip_path):
            os.remove(zip_path)
        shutil.rmtree(self._job_folder(job), ignore_errors=True)
        self.job = None

    # -- rendering -------------------------------------------------------

    def povray_args(self, job, batch):
        """Return the POV-Ray command line the client runs for `batch`."""
        args = self.povray + ["-D", "pov.ini", "+O%s_" % job.name,
                              "+SF%d" % batch.startframe,
                              "+EF%d" % batch.stopframe]
        # +FN goes before +FP so that a slice still comes out as PPM.
        if self.adds_png_option:
            args.append("+FN")
        if batch.is_slice:
            args += ["+SR%d" % batch.startrow, "+ER%d" % batch.endrow,
                     "+FP"]
        return args

    def _output_pattern(self, job, batch):
        extension = "ppm" if batch.is_slice else "png"
        return re.compile(r"^%s_(\d+)\.%s$" % (re.escape(job.name),
                                                extension))

    def _remove_outputs(self, folder, job):
        pattern = re.compile(r"^%s_\d+\.(png|ppm)$" % re.escape(job.name))
        for entry in os.listdir(folder):
            if pattern.match(entry):
                os.remove(os.path.join(folder, entry))

    def _render_batch(self, job, batch):
        self.batch = batch
        folder = self._job_folder(job)
        if self.fail_render:
            self._abort_batch(job, batch, "fail_render is set")
        self._remove_outputs(folder, job)
        run = RenderRun(self.povray_args(job, batch), folder)
        self.renders.append(run)
        self._run_povray(job, batch, run)
        if run.failure:
            self._abort_batch(job, batch, run.failure)
        if self.crash_after_render:
            raise ClientExit(EXIT_CRASHED, "crash_after_render is set")
        filename, data = self._build_result_zip(job, batch, run)
        self._remove_outputs(folder, job)
        self._post_batch(job, batch, filename, data)
        self.batch = None

    def _ping(self, job, batch):
        exchange = self._request_once("active", [("batch", batch.id),
                                                 ("job", job.id)])
        if exchange.error is None:
            self._read_reply(exchange)
            self._expect_keys(exchange, ["status"])

    def _run_povray(self, job, batch, run):
        """Run POV-Ray with pings; set run.failure when the render failed."""
        report_path = os.path.join(self.workdir, ".povray-output.txt")
        started = time.time()
        with open(report_path, "wb") as report:
            try:
                process = subprocess.Popen(run.args, cwd=run.cwd,
                                           stdin=subprocess.DEVNULL,
                                           stdout=report,
                                           stderr=subprocess.STDOUT)
            except OSError as error:
                run.failure = "cannot start POV-Ray: %s" % error
                return
            try:
                run.returncode = self._wait_with_pings(process, job, batch,
                                                       started)
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()
        with open(report_path, "rb") as report:
            run.output = report.read()
        os.remove(report_path)
        if run.returncode is None:
            run.failure = ("POV-Ray timed out after %g s"
                           % self.render_timeout)
        elif run.returncode != 0:
            run.failure = "POV-Ray exited with %d" % run.returncode
        elif b"Parse Error" in run.output:
            run.failure = "POV-Ray output contains Parse Error"
        elif b"Aborting render" in run.output:
            run.failure = "POV-Ray output contains Aborting render"
        else:
            run.failure = self._find_outputs(job, batch, run)

    def _wait_with_pings(self, process, job, batch, started):
        """Wait for POV-Ray and render_delay; return its exit code.

        Returns None when render_timeout ran out. Raises ClientExit when
        stop() is called meanwhile.
        """
        interval = self.active_interval
        next_ping = started + interval if interval else None
        returncode = None
        ended = None
        while True:
            now = time.time()
            if self._stop_event.is_set():
                raise ClientExit(EXIT_STOPPED, "stop() called while "
                                 "rendering")
            if returncode is None:
                returncode = process.poll()
                if returncode is not None:
                    ended = now
            if (returncode is not None
                    and now >= ended + self.render_delay * self.time_scale):
                return returncode
            if now >= started + self.render_timeout:
                return None
            if next_ping is not None and now >= next_ping:
                self._ping(job, batch)
                next_ping = now + interval
            wake = [started + self.render_timeout, now + 0.05]
            if next_ping is not None:
                wake.append(next_ping)
            time.sleep(max(0.0, min(wake) - time.time()))

    def _find_outputs(self, job, batch, run):
        """Collect POV-Ray's output files; return a failure text or None."""
        pattern = self._output_pattern(job, batch)
        by_frame = {}
        for entry in sorted(os.listdir(run.cwd)):
            match = pattern.match(entry)
            if match:
                by_frame.setdefault(int(match.group(1)), entry)
        for frame in range(batch.startframe, batch.stopframe + 1):
            if frame not in by_frame:
                return ("POV-Ray wrote no output file for frame %d "
                        "(expected %s_<frame>.%s)" % (
                            frame, job.name,
                            "ppm" if batch.is_slice else "png"))
            run.files.append(by_frame[frame])
        self._check_padding(job, run.files, pattern)
        return None

    def _check_padding(self, job, files, pattern):
        # pov.ini sets Final_Frame to the frame count (2 for a still), and
        # POV-Ray 3.7 pads frame numbers to the digits of Final_Frame.
        digits = len(str(job.frames))
        for entry in files:
            if len(pattern.match(entry).group(1)) != digits:
                self._record_violation(
                    "POV-Ray wrote %s, but a job of %d frames should pad "
                    "frame numbers to %d digits (Final_Frame=%d in pov.ini)"
                    % (entry, job.frames, digits, max(job.frames, 2)))

    def _abort_batch(self, job, batch, reason):
        self._print("Render failed: %s" % reason)
        exchange = self._request("abortbatch", [("batch", batch.id),
                                                ("job", job.id)])
        self._read_reply(exchange)
        # Old clients ignore the status value (0.9 always sent error).
        self._expect_keys(exchange, ["status"])
        raise ClientExit(EXIT_RENDER_FAILED, reason)

    # -- upload ----------------------------------------------------------

    def result_names(self, job, batch):
        """Return (zip file name, folder name inside it) for `batch`."""
        folder = "%s_frame_%08d" % (job.name, batch.startframe)
        if batch.is_slice:
            return "%s_%04d.zip" % (folder, batch.slice), folder
        return folder + ".zip", folder

    def _build_result_zip(self, job, batch, run):
        filename, folder = self.result_names(job, batch)
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            if self.zip_folder_entry:
                archive.writestr(zipfile.ZipInfo(folder + "/"), b"")
            if batch.is_slice:
                archive.write(os.path.join(run.cwd, run.files[0]),
                              "%s/slice_%04d.ppm" % (folder, batch.slice))
                archive.writestr("%s/batchreport_%04d.txt"
                                 % (folder, batch.slice), run.output)
            else:
                for entry in run.files:
                    archive.write(os.path.join(run.cwd, entry),
                                  folder + "/" + entry)
                if self.writes_batchreport:
                    archive.writestr(folder + "/batchreport.txt",
                                     run.output)
        return filename, buffer.getvalue()

    def _post_batch(self, job, batch, filename, data):
        if self.upload_filter is not None:
            filename, data = self.upload_filter(filename, data)
        upload = Upload(filename, data, job.id, batch.id)
        self.uploads.append(upload)
        body, content_type = encode_multipart(
            "filedata", filename, data, "application/octet-stream")
        exchange = self._request("postbatch",
                                 [("batch", batch.id), ("job", job.id)],
                                 body, content_type)
        self._read_reply(exchange)
        self._expect_keys(exchange, ["status"])
        upload.reply = self._value_at(exchange, 0, "status")
        if upload.reply == "ok":
            self.batches_done += 1
        else:
            self._print("Upload of %s was not accepted (status=%s)"
                        % (filename, upload.reply))


class BashClient(LegacyClient):
    """Emulator of the HTTPov Bash client 1.2.

    `server` is a base URL such as http://127.0.0.1:8080/legacy/TOKEN; the
    client requests <base>/httpov.php and <base>/jobs/<name>.zip. Like
    curl without -f it reads the reply body whatever the HTTP status,
    relies on PNG being POV-Ray's default output format, and zips the
    result folder with its folder entry (as zip -r does).
    """

    family = "1"
    default_version = "1.2"
    zip_folder_entry = True
    user_agent = "legacy-bash-client-emulator/1.2"

    def _parse_server(self, server):
        parts = urllib.parse.urlsplit(server)
        if parts.scheme != "http":
            raise ValueError("Bash client server setting %r must be an "
                             "http:// URL" % server)
        if parts.query or parts.fragment:
            raise ValueError("Bash client server setting %r must not have "
                             "a query or fragment" % server)
        host, port = split_host_port(parts.netloc)
        return host, port, parts.path.rstrip("/")


class PythonClient(LegacyClient):
    """Emulator of the HTTPov Python client 2.2.1.

    `server` is a bare host or host:port; the client always requests
    http://host:port/httpov.php and /jobs/<name>.zip at the server root.
    HTTP statuses 4xx and 5xx count as network errors and are retried. It
    adds +FN to POV-Ray's command and puts batchreport.txt (POV-Ray's
    console output) into the zip of whole frames.
    """

    family = "2"
    default_version = "2.2.1"
    adds_png_option = True
    writes_batchreport = True
    fails_on_http_error = True
    user_agent = "legacy-python-client-emulator/2.2.1"

    def _parse_server(self, server):
        if "/" in server:
            raise ValueError("Python client server setting %r must be a "
                             "bare host[:port]" % server)
        host, port = split_host_port(server)
        return host, port, ""


def legacy_job_row(**changes):
    """A jobs row as section 7 reads it."""
    row = {"id": 7, "name": "demo", "root": "", "ini": None,
           "first_frame": 1, "frame_count": 2, "povray_options": "[]",
           "row_ranges": "[[1, 48]]",
           "settings": json.dumps({"width": 64, "height": 48, "depth": 8,
                                   "alpha": False, "animated": True,
                                   "initial_frame": 1, "final_frame": 2,
                                   "initial_clock": 0.0, "final_clock": 1.0,
                                   "cyclic": False, "input_file": "s.pov"})}
    row.update(changes)
    return row


class LegacyUnitTest(unittest.TestCase):
    """The pieces of section 7 that need no server."""

    def setUp(self):
        self.folder = make_temp_dir(prefix="httpov-legacy-unit-")
        self.addCleanup(shutil.rmtree, self.folder, True)

    def convert(self, members, job=None, frames=(1, 1)):
        upload = os.path.join(self.folder, "upload.zip")
        with open(upload, "wb") as out:
            out.write(members if isinstance(members, bytes)
                      else zip_bytes(list(members.items())))
        task = {"frame_first": frames[0], "frame_last": frames[1],
                "row_first": 1, "row_last": 48}
        counter = iter(range(1000))
        httpov.convert_legacy_upload(
            upload, job or legacy_job_row(), task,
            os.path.join(self.folder, "result.zip"),
            lambda: os.path.join(self.folder, "t%d" % next(counter)))

    def test_reports_read_up_to_log_limit(self):
        members = {"r/%d/batchreport.txt" % number: b"A" * 65536
                   for number in range(200)}
        path = os.path.join(self.folder, "reports.zip")
        with open(path, "wb") as out:
            out.write(zip_bytes(list(members.items())))
        with zipfile.ZipFile(path) as archive:
            log = httpov.read_legacy_log(archive, archive.namelist())
        self.assertEqual(len(log), httpov.MAX_LOG_BYTES)

    def test_frame_larger_than_a_png_rejected(self):
        members = {"7-demo_0.png": httpov.PNG_SIGNATURE + bytes(8 << 20)}
        with self.assertRaisesRegex(httpov.TooLarge, "unpacks to"):
            self.convert(members)

    def test_unknown_compression_rejected(self):
        data = bytearray(zip_bytes([("7-demo_0.png", b"x" * 10)]))
        data[8:10] = struct.pack("<H", 97)
        central = data.index(b"PK\x01\x02")
        data[central + 10:central + 12] = struct.pack("<H", 97)
        with self.assertRaisesRegex(httpov.UserError, "NotImplemented"):
            self.convert(bytes(data))

    def test_slice_of_other_frame_rejected(self):
        job = legacy_job_row(row_ranges="[[1, 32], [33, 48]]")
        with self.assertRaisesRegex(httpov.UserError,
                                    "7-demo_frame_00000000/slice_0000"):
            self.convert({"7-demo_frame_00000001/slice_0000.ppm":
                          b"P6\n64 48\n255\n"}, job)

    def test_layout_keeps_pov_ini_the_farms(self):
        job = legacy_job_row(root="scene/", ini="pov.ini")
        names = ["scene/pov.ini", "scene/httpov-job.ini", "scene/POV.INI",
                 "scene/s.pov", "other/x.inc", "scene/sub/"]
        layout, ini = httpov.legacy_layout(names, job)
        self.assertEqual(ini, "httpov-job-2.ini")
        self.assertEqual(layout, {"scene/pov.ini": "httpov-job-2.ini",
                                  "scene/httpov-job.ini": "httpov-job.ini",
                                  "scene/s.pov": "s.pov"})

    def test_pov_ini_keeps_clocks(self):
        job = legacy_job_row(first_frame=3, frame_count=4)
        settings = json.loads(job["settings"])
        settings.update(initial_frame=1, final_frame=11, cyclic=True)
        job["settings"] = json.dumps(settings)
        text = httpov.legacy_pov_ini(job, None)
        self.assertIn("Initial_Frame=0\nFinal_Frame=4\n", text)
        first = float(re.search(r"Initial_Clock=(\S+)", text).group(1))
        last = float(re.search(r"Final_Clock=(\S+)", text).group(1))
        # Cyclic frames 1-11 step the clock by 1/11; frame 3 is 2/11.
        self.assertAlmostEqual(first, 2 / 11)
        self.assertAlmostEqual((last - first) / 4, 1 / 11)

    def test_version_with_huge_number(self):
        self.assertEqual(httpov.version_tuple("1." + "9" * 5000), (1, 0))
        self.assertEqual(httpov.version_tuple("2.2.1"), (2, 2, 1))


@needs_povray
class LegacyProtocolTest(unittest.TestCase):
    """Old HTTPov clients, emulated as the documented protocol describes,
    render real jobs with real POV-Ray for a real server."""

    def setUp(self):
        self.folder = make_temp_dir(prefix="httpov-legacy-")
        self.addCleanup(shutil.rmtree, self.folder, True)
        self.clients = []
        self.addCleanup(self.stop_clients)

    def start_server(self, *extra):
        self.server = ServerProcess(os.path.join(self.folder, "data"),
                                    extra=extra)
        self.addCleanup(self.server.stop)
        self.client = self.server.client()
        self.addCleanup(self.client.close)

    def stop_clients(self):
        for client in self.clients:
            client.stop()
        for client in self.clients:
            client.join(30)

    def submit(self, path, *options):
        result = run_cli("submit", self.server.url, path, "--token",
                         self.server.admin, *options)
        self.assertEqual(result.returncode, 0, result.stderr)
        return int(result.stdout)

    def old_client(self, kind, **options):
        if kind is BashClient:
            server = "%slegacy/%s" % (self.server.url, self.server.worker)
        else:
            server = "127.0.0.1:%d" % self.server.port
        options.setdefault("cid", len(self.clients) + 1)
        options.setdefault("hostname", "oldbox")
        options.setdefault("time_scale", 0.05)
        options.setdefault("active_interval", 1.0)
        options.setdefault("verurl", "%slegacy/version" % self.server.url)
        client = kind(server, povray=[POVRAY],
                      workdir=make_temp_dir(dir=self.folder), **options)
        self.clients.append(client)
        client.start()
        return client

    def raw(self, path, method="GET"):
        connection = http.client.HTTPConnection("127.0.0.1",
                                                self.server.port, timeout=10)
        try:
            connection.request(method, path)
            response = connection.getresponse()
            return (response.status, response.getheader("Content-Type"),
                    response.read().decode())
        finally:
            connection.close()

    def test_bash_client_renders_sliced_still(self):
        self.start_server()
        source = os.path.join(EXAMPLES, "sliced-still")
        job_id = self.submit(source, "--slices", "4", "--", "+W160",
                             "+H120")
        old = self.old_client(BashClient, version="1.2")
        job = wait_for_job(self.client, job_id, 180)
        self.assertEqual(job["state"], "done", job["error"])
        reference = os.path.join(self.folder, "ref")
        os.makedirs(reference)
        render_plain(source, os.path.join(reference, "still.png"),
                     "+W160", "+H120")
        _, expected = decode_rows(os.path.join(reference, "still.png"))
        target = os.path.join(self.folder, "still.png")
        self.client.download("/api/jobs/%d/frames/%d.png"
                             % (job_id, job["first_frame"]), target)
        info, actual = decode_rows(target)
        self.assertEqual((info.width, info.height), (160, 120))
        self.assertEqual(actual, expected, "stitched PPM slices differ")
        self.assertEqual(old.violations, [])
        self.assertTrue(old.uploads)
        self.assertEqual({upload.reply for upload in old.uploads}, {"ok"})
        self.assertEqual(old.latest_version, "1.2")
        names = [worker["name"] for worker in
                 self.client.call("GET", "/api/workers")["workers"]]
        self.assertIn("oldbox:1", names)

    def test_python_client_renders_animation_at_root(self):
        self.start_server("--legacy-clients", "127.0.0.0/8,::1")
        source = os.path.join(EXAMPLES, "animation")
        job_id = self.submit(source, "--frames", "3-6")
        old = self.old_client(PythonClient)
        job = wait_for_job(self.client, job_id, 180)
        self.assertEqual(job["state"], "done", job["error"])
        reference = os.path.join(self.folder, "anim-ref")
        os.makedirs(reference)
        render_plain(source, os.path.join(reference, "f"), "+SF5", "+EF5")
        _, expected = decode_rows(os.path.join(reference, "f05.png"))
        target = os.path.join(self.folder, "f5.png")
        self.client.download("/api/jobs/%d/frames/5.png" % job_id, target)
        _, actual = decode_rows(target)
        self.assertEqual(actual, expected,
                         "frame 5 (legacy frame 2) has another clock")
        self.assertEqual(old.violations, [])
        started = sorted(int(exchange.value("startframe"))
                         for exchange in old.requests("getbatch")
                         if exchange.value("command") == "render")
        self.assertEqual(started[0], 0)

    def sphere_job(self, *options):
        scene = os.path.join(self.folder, "ball.pov")
        with open(scene, "wb") as out:
            out.write(SPHERE_SCENE)
        return self.submit(scene, *options)

    def test_abortbatch_and_crash_requeue_the_task(self):
        self.start_server("--legacy-lease", "3")
        job_id = self.sphere_job("--", "+W48", "+H32")
        quitter = self.old_client(BashClient, fail_render=True)
        quitter.join(60)
        self.assertEqual(quitter.exit_reason, "render-failed")
        task = self.client.call("GET", "/api/jobs/%d/tasks"
                                % job_id)["tasks"][0]
        self.assertEqual((task["state"], task["attempts"]), ("queued", 1))
        self.assertIn("gave the batch up", task["error"])
        crasher = self.old_client(BashClient, crash_after_render=True)
        crasher.join(60)
        self.assertEqual(crasher.exit_reason, "crashed")
        self.old_client(BashClient)
        job = wait_for_job(self.client, job_id, 60)
        self.assertEqual(job["state"], "done", job["error"])
        task = self.client.call("GET", "/api/jobs/%d/tasks"
                                % job_id)["tasks"][0]
        self.assertEqual(task["attempts"], 3, "abort, expired lease, done")

    def test_active_ping_renews_lease(self):
        self.start_server("--legacy-lease", "2")
        job_id = self.sphere_job("--", "+W48", "+H32")
        slow = self.old_client(BashClient, render_delay=6,
                               active_interval=0.5, time_scale=1.0)
        deadline = time.time() + 30
        while not slow.requests("active") and time.time() < deadline:
            time.sleep(0.2)
        other = BashClient("%slegacy/%s" % (self.server.url,
                                            self.server.worker),
                           hostname="other", cid=9, povray=[POVRAY],
                           workdir=make_temp_dir(dir=self.folder))
        self.assertEqual(other.send("getbatch", job=str(job_id)).lines,
                         ["command=sleep"],
                         "the only task is rendering: wait in the job")
        job = wait_for_job(self.client, job_id, 60)
        self.assertEqual(job["state"], "done", job["error"])
        self.assertGreaterEqual(len(slow.requests("active")), 8)
        task = self.client.call("GET", "/api/jobs/%d/tasks"
                                % job_id)["tasks"][0]
        self.assertEqual(task["attempts"], 1)

    def test_max_workers_applies_to_old_clients(self):
        self.start_server()
        job_id = self.sphere_job("--frames-per-task", "1", "--max-workers",
                                 "1", "--", "+W48", "+H32", "+KFI1",
                                 "+KFF4")
        first = self.old_client(BashClient, render_delay=4, time_scale=1.0)
        deadline = time.time() + 30
        while not first.requests("active") and time.time() < deadline:
            time.sleep(0.2)
        second = BashClient("%slegacy/%s" % (self.server.url,
                                             self.server.worker),
                            hostname="other", cid=9, povray=[POVRAY],
                            workdir=make_temp_dir(dir=self.folder))
        reply = second.send("getjob")
        self.assertEqual(reply.lines, ["command=sleep"])
        reply = second.send("getbatch", job=str(job_id))
        self.assertEqual(reply.lines, ["command=getjob"])
        job = wait_for_job(self.client, job_id, 90)
        self.assertEqual(job["state"], "done", job["error"])

    def test_access_needs_token_or_network(self):
        self.start_server()
        query = "command=hello&client=a:1&version=1.2"
        # The protocol's replies are status 200; old clients then print
        # the error line and exit.
        status, kind, text = self.raw("/httpov.php?" + query)
        self.assertEqual((status, kind), (200, "text/plain; charset=utf-8"))
        self.assertTrue(text.startswith("error=this server does not accept"))
        status, _, text = self.raw("/legacy/%s/httpov.php?%s"
                                   % ("x" * 64, query))
        self.assertEqual(status, 200)
        self.assertTrue(text.startswith("error=the server address holds"))
        status, _, _ = self.raw("/legacy/%s/jobs/1-x.zip" % ("x" * 64))
        self.assertEqual(status, 401)
        status, _, text = self.raw("/legacy/%s/httpov.php?%s"
                                   % (self.server.worker, query))
        self.assertEqual((status, text),
                         (200, "message=httpov %s ready.\n"
                          % httpov.__version__))
        status, _, text = self.raw("/legacy/%s/httpov.php?%s"
                                   % (self.server.admin, query))
        self.assertTrue(text.startswith("error="),
                        "the admin token is not for workers")
        with open(self.server.log_path) as log:
            self.assertNotIn(self.server.worker, log.read())

    def test_replies_in_protocol_order(self):
        self.start_server("--legacy-clients", "127.0.0.1")
        base = "/httpov.php?client=box:7&"
        cases = [
            ("command=hello", ["command=sleep", "message=HTTPov client "
                               "(no version) is too old for this server; "
                               "install client 1.2 or 2.2.1, or httpov.py"]),
            ("command=hello&version=0.9", None),
            ("command=frobnicate&version=1.2", ["command=unknown"]),
            ("command=abort&version=1.2", []),
            ("command=getjob&version=2.2.1", ["command=sleep"]),
            ("command=getbatch&job=99&version=2.2.1", ["command=getjob"]),
            ("command=active&job=1&batch=5&version=1.2", ["status=error"]),
            ("command=getbatch&job=x;rm&version=1.2", ["command=sleep"]),
        ]
        for query, expected in cases:
            with self.subTest(query=query):
                status, kind, text = self.raw(base + query)
                self.assertEqual(status, 200)
                self.assertEqual(kind, "text/plain; charset=utf-8")
                lines = text.split("\n")
                self.assertEqual(lines[-1], "")
                if expected is None:
                    self.assertEqual(lines[0], "command=sleep")
                    self.assertIn("0.9 is too old", lines[1])
                else:
                    self.assertEqual(lines[:-1], expected)

        job_id = self.sphere_job("--", "+W48", "+H32")
        status, _, text = self.raw(base + "command=getjob&version=1.1")
        self.assertEqual(text.split("\n")[:4],
                         ["command=getbatch", "job=%d" % job_id,
                          "name=%d-ball" % job_id, "frames=1"])
        self.assertTrue(text.split("\n")[4].startswith("message="),
                        "level 1 clients are told to upgrade")

        status, _, text = self.raw("/legacy/version?version=2.2")
        self.assertEqual(text, "clientver=2.2.1\n")

        status, _, _ = self.raw(base + "command=getbatch&job=%d&version=1.2"
                                % job_id, "HEAD")
        self.assertEqual(status, 405, "HEAD must not lease a task")

        status, kind, text = self.raw(base + "command=postbatch&job=1"
                                      "&batch=1&version=1.2", "POST")
        self.assertEqual((status, kind, text),
                         (200, "text/plain; charset=utf-8",
                          "status=error\n"))

        workers = self.client.call("GET", "/api/workers")["workers"]
        self.assertEqual([worker["name"] for worker in workers], ["box:7"],
                         "hello and abort register no worker")

    def test_idle_clients_back_off_then_render(self):
        self.start_server()
        idle = self.old_client(BashClient, max_sleeps=6, sleep_cap=16,
                               time_scale=0.01)
        idle.join(60)
        self.assertEqual(idle.exit_reason, "stopped")
        self.assertEqual(idle.sleeps, [2, 4, 8, 16, 16, 16])
        self.assertEqual({exchange.text for exchange in
                          idle.requests("getjob")}, {"command=sleep\n"})
        self.assertEqual(idle.violations, [])
        job_id = self.sphere_job("--", "+W48", "+H32")
        self.old_client(BashClient)
        job = wait_for_job(self.client, job_id, 60)
        self.assertEqual(job["state"], "done", job["error"])

    def test_alpha_slices_are_not_offered(self):
        self.start_server("--legacy-clients", "127.0.0.1")
        self.sphere_job("--slices", "2", "--", "+W48", "+H64", "+UA")
        status, _, text = self.raw("/httpov.php?command=getjob&client=a:1"
                                   "&version=1.2")
        self.assertEqual(text, "command=sleep\n",
                         "PPM slices cannot carry alpha")

    def test_bad_uploads_are_refused_and_requeued(self):
        self.start_server()
        job_id = self.sphere_job("--", "+W48", "+H32")

        def drop_frames(filename, data):
            broken = io.BytesIO()
            with zipfile.ZipFile(broken, "w") as archive:
                archive.writestr("readme.txt", "no pictures")
            return filename, broken.getvalue()

        bad = self.old_client(BashClient, upload_filter=drop_frames,
                              max_cycles=3)
        bad.join(60)
        self.assertEqual([upload.reply for upload in bad.uploads][:1],
                         ["error"])
        task = self.client.call("GET", "/api/jobs/%d/tasks"
                                % job_id)["tasks"][0]
        self.assertIn("missing from the upload", task["error"])
        self.assertIn(task["state"], ("queued", "leased"))
        status, _, text = self.raw("/jobs/%d-other.zip" % job_id)
        self.assertEqual(status, 403)


# ---------------------------------------------------------------------------
# Examples: workers on many machines (examples/cluster/)
# ---------------------------------------------------------------------------

CLUSTER = os.path.join(HERE, "examples", "cluster")
UNIT = "httpov-worker.service"
SLURM = "slurm-workers.sh"
CONDOR_SUBMIT = "htcondor-workers.sub"
CONDOR_WRAPPER = "htcondor-worker.sh"
KUBERNETES = "kubernetes-workers.yaml"
PLACEHOLDER_URL = "http://farm.example:8080/"
# Placeholder hosts: the reserved .example and .invalid names, and
# loopback.
ALLOWED_HOST = re.compile(r"^(.+\.example|.+\.invalid|127\.0\.0\.1|::1|"
                          r"localhost)$")
# Unit settings that cover parts of /proc or forbid user namespaces, which
# would stop bubblewrap from confining POV-Ray.
BWRAP_BREAKING_SETTINGS = ("RestrictNamespaces", "ProtectKernelTunables",
                           "ProtectKernelLogs", "ProtectProc", "ProcSubset")
TINY_SCENE = b"""
camera { location <0, 1, -3> look_at <0, 0.5, 0> }
light_source { <3, 5, -4> color rgb 1 }
sphere { <0, 0.5, 0>, 0.5 pigment { color rgb <1, 0.5, 0.2> } }
"""
# A fake python3 that records its arguments and HTTPOV_TOKEN, so that the
# shell scripts can run without a server.
RECORDING_PYTHON = """#!/bin/sh
printf '%s\\0' "$@" > "$RECORD_ARGS"
printf '%s' "$HTTPOV_TOKEN" > "$RECORD_TOKEN"
"""
STOP_SECONDS = 60


def read_example(name):
    with open(os.path.join(CLUSTER, name)) as source:
        return source.read()


def unit_settings(text):
    """Return [(section, key, value)] of a systemd unit, in file order."""
    text = re.sub(r"\\\n", " ", text)
    settings = []
    section = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.append((section, key.strip(), value.strip()))
    return settings


def unit_value(settings, key):
    values = [value for _, name, value in settings if name == key]
    return values[-1] if values else None


def submit_commands(text):
    """Return ({name: value}, queue argument) of an HTCondor submit file.

    Macros $(NAME) expand to the file's own commands. Cluster and
    Process become 1 and 0, and $ENV(NAME) reads the test's environment.
    """
    text = re.sub(r"\\\n", " ", text)
    commands = {}
    queue = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.lower().split()[0] == "queue":
            queue = line[len("queue"):].strip()
            continue
        name, _, value = line.partition("=")
        commands[name.strip().lower()] = value.strip()
    fixed = {"cluster": "1", "process": "0"}

    def expand(match):
        if match.group(1):
            return os.environ.get(match.group(2), "")
        name = match.group(2).lower()
        return fixed.get(name, commands.get(name, match.group(0)))

    pattern = re.compile(r"\$(ENV)?\(([A-Za-z_]+)\)")
    for name, value in list(commands.items()):
        commands[name] = pattern.sub(expand, value)
    return commands, queue


def condor_arguments(value):
    """Split an HTCondor 'arguments' value in the new, quoted syntax."""
    if not (value.startswith('"') and value.endswith('"')):
        raise ValueError("arguments %r is not in the quoted syntax" % value)
    return shlex.split(value[1:-1].replace('""', '\\"'))


def kubernetes_documents():
    try:
        import yaml
    except ImportError:
        raise AssertionError("PyYAML is required for the Kubernetes "
                             "example test: pip install pyyaml")
    with open(os.path.join(CLUSTER, KUBERNETES)) as source:
        return [document for document in yaml.safe_load_all(source)
                if document is not None]


def kubernetes_worker(documents):
    """Return the Deployment and its first container."""
    deployments = [document for document in documents
                   if document.get("kind") == "Deployment"]
    deployment = deployments[0]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return deployment, container


def kubernetes_command(container, values):
    """Return the container's command line with $(VAR) expanded.

    ``values`` gives the variables that come from a Secret or a field.
    """
    environment = dict(values)
    for variable in container.get("env", []):
        if "value" in variable and variable["name"] not in values:
            environment[variable["name"]] = variable["value"]

    def expand(match):
        return environment.get(match.group(1), match.group(0))

    words = list(container.get("command", [])) + list(
        container.get("args", []))
    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", expand, word)
            for word in words]


def unit_command(url):
    settings = unit_settings(read_example(UNIT))
    command = unit_value(settings, "ExecStart").replace("${HTTPOV_URL}", url)
    return shlex.split(command)


def map_mounted_path(word, mounts):
    """Replace a container path in ``word`` (or in its --option=value)
    with the local folder of the longest matching mount."""
    option, equals, value = word.rpartition("=")
    if not equals:
        option, value = "", word
    for path in sorted(mounts, key=len, reverse=True):
        if value == path or value.startswith(path + "/"):
            return option + equals + mounts[path] + value[len(path):]
    return word


def parse_work_arguments(test, arguments):
    """Parse 'work' arguments with httpov's parser, failing the test on
    an argument the parser rejects."""
    try:
        return httpov.build_parser().parse_args(arguments)
    except SystemExit:
        test.fail("httpov's parser rejected %r" % (arguments,))


class ClusterExamplesTest(unittest.TestCase):
    """Checks of the files in examples/cluster/ and the workers they
    start."""

    def setUp(self):
        self.folder = make_temp_dir(prefix="httpov-cluster-")
        self.addCleanup(shutil.rmtree, self.folder, True)

    # -- static checks ------------------------------------------------------

    def test_shell_scripts_syntax(self):
        for name in (SLURM, CONDOR_WRAPPER):
            with self.subTest(script=name):
                result = subprocess.run(
                    ["bash", "-n", os.path.join(CLUSTER, name)],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    universal_newlines=True)
                self.assertEqual(result.returncode, 0, result.stderr)
                self.assertTrue(os.access(os.path.join(CLUSTER, name),
                                          os.X_OK), "%s is not executable"
                                % name)

    def test_urls_are_placeholders(self):
        for name in sorted(os.listdir(CLUSTER)):
            text = read_example(name)
            for url in re.findall(r"https?://[^\s\"'`)]+", text):
                with self.subTest(file=name, url=url):
                    host = urllib.parse.urlsplit(url).hostname
                    self.assertRegex(host, ALLOWED_HOST)

    @needs_tool("systemd-analyze")
    def test_systemd_unit_verifies(self):
        self.assertTrue(shutil.which("systemd-analyze"),
                        "systemd-analyze is required (HTTPOV_CI=1)")
        # verify checks that the ExecStart program exists, so point the
        # copy at this Python when /usr/bin/python3 is missing.
        text = read_example(UNIT)
        if not os.path.exists("/usr/bin/python3"):
            text = text.replace("/usr/bin/python3", sys.executable)
        path = os.path.join(self.folder, UNIT)
        with open(path, "w") as out:
            out.write(text)
        result = subprocess.run(
            ["systemd-analyze", "verify", path], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, universal_newlines=True)
        self.assertEqual(result.returncode, 0, result.stdout)
        # verify (systemd 252) exits with 0 after unknown keys and invalid
        # values, and names the unit file in its warnings.
        warnings = [line for line in result.stdout.splitlines()
                    if UNIT in line]
        self.assertEqual(warnings, [])

    def test_systemd_unit_settings(self):
        settings = unit_settings(read_example(UNIT))
        self.assertNotIn(unit_value(settings, "User"), (None, "root", "0"))
        self.assertEqual(unit_value(settings, "Restart"), "on-failure")
        self.assertEqual(unit_value(settings, "NoNewPrivileges"), "yes")
        self.assertEqual(unit_value(settings, "ProtectSystem"), "strict")
        self.assertEqual(unit_value(settings, "PrivateTmp"), "yes")
        self.assertEqual(unit_value(settings, "EnvironmentFile"),
                         "/etc/httpov/worker.env")
        for key in BWRAP_BREAKING_SETTINGS:
            self.assertIsNone(unit_value(settings, key),
                              "%s stops bubblewrap" % key)
        state = unit_value(settings, "StateDirectory")
        self.assertTrue(state, "StateDirectory= is missing")
        args = parse_work_arguments(self, unit_command(PLACEHOLDER_URL)[2:])
        # ProtectSystem=strict leaves only the state directory writable.
        self.assertEqual(args.workdir, "/var/lib/" + state)

    def test_kubernetes_deployment(self):
        documents = kubernetes_documents()
        self.assertEqual([document["kind"] for document in documents],
                         ["Deployment"])
        deployment, container = kubernetes_worker(documents)
        self.assertEqual(deployment["apiVersion"], "apps/v1")
        spec = deployment["spec"]
        self.assertIsInstance(spec["replicas"], int)
        self.assertGreaterEqual(spec["replicas"], 1)
        labels = spec["template"]["metadata"]["labels"]
        for key, value in spec["selector"]["matchLabels"].items():
            self.assertEqual(labels.get(key), value)
        pod = spec["template"]["spec"]
        self.assertIs(pod["securityContext"]["runAsNonRoot"], True)
        self.assertNotEqual(pod["securityContext"].get("runAsUser"), 0)
        self.assertIs(container["securityContext"]
                      ["allowPrivilegeEscalation"], False)

        command = container["command"]
        self.assertEqual(command[0], "python3")
        self.assertEqual(os.path.basename(command[1]), "httpov.py")
        self.assertEqual(command[2], "work")
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        mounts = {mount["mountPath"]: volumes[mount["name"]]
                  for mount in container["volumeMounts"]}
        self.assertIn("configMap", mounts[os.path.dirname(command[1])],
                      "httpov.py is not mounted from a ConfigMap")

        tokens = [variable for variable in container["env"]
                  if variable["name"] == "HTTPOV_TOKEN"]
        self.assertEqual(len(tokens), 1)
        self.assertIn("secretKeyRef", tokens[0]["valueFrom"])

        resources = container["resources"]
        for kind in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                self.assertIn(resource, resources[kind],
                              "%s.%s is missing" % (kind, resource))
        args = parse_work_arguments(
            self, kubernetes_command(container, {"HTTPOV_TOKEN": "t",
                                                 "POD_NAME": "pod"})[2:])
        # Python counts the node's cores, not the pod's CPU limit.
        self.assertEqual(str(args.threads), str(resources["limits"]["cpu"]))
        # The root file system is read-only, so the work folder must be a
        # volume.
        self.assertIn(args.workdir, mounts)
        self.assertIn("emptyDir", mounts[args.workdir])

    def test_htcondor_submit_description(self):
        commands, queue = submit_commands(read_example(CONDOR_SUBMIT))
        self.assertIsNotNone(queue, "the submit file has no queue command")
        self.assertRegex(queue, r"^\d+$")
        self.assertGreaterEqual(int(queue), 1)
        self.assertEqual(commands["universe"], "vanilla")
        executable = os.path.join(CLUSTER, commands["executable"])
        self.assertTrue(os.access(executable, os.X_OK),
                        "%s is not executable" % executable)
        inputs = [name.strip() for name in
                  commands["transfer_input_files"].split(",")]
        scripts = [name for name in inputs
                   if os.path.basename(name) == "httpov.py"]
        self.assertEqual(len(scripts), 1, "httpov.py is not transferred")
        self.assertTrue(os.path.samefile(
            os.path.join(CLUSTER, scripts[0]),
            os.path.join(HERE, "httpov.py")))
        self.assertIn("worker-token",
                      [os.path.basename(name) for name in inputs])
        self.assertEqual(commands["transfer_output_files"], '""')
        args = parse_work_arguments(
            self, ["work"] + condor_arguments(commands["arguments"]))
        self.assertEqual(str(args.threads), commands["request_cpus"])

    def test_worker_arguments_parse(self):
        """Each file's worker command line passes httpov's parser, names
        the placeholder server and keeps the token off the command line."""
        _, container = kubernetes_worker(kubernetes_documents())
        commands, _ = submit_commands(read_example(CONDOR_SUBMIT))
        slurm, _ = self.record_slurm_script()
        condor, _ = self.record_condor_wrapper(
            condor_arguments(commands["arguments"]))
        command_lines = {
            UNIT: unit_command(PLACEHOLDER_URL)[2:],
            SLURM: slurm[1:],
            CONDOR_SUBMIT: condor[1:],
            KUBERNETES: kubernetes_command(
                container, {"HTTPOV_TOKEN": "t", "POD_NAME": "pod"})[2:],
        }
        for name, arguments in command_lines.items():
            with self.subTest(file=name):
                args = parse_work_arguments(self, arguments)
                self.assertEqual(args.command, "work")
                self.assertEqual(args.url, PLACEHOLDER_URL)
                self.assertIsNone(args.token)
                self.assertIsNotNone(args.workdir)
                # Batch slots are freed when the farm runs dry; services
                # would only be started again.
                self.assertEqual(args.exit_when_idle > 0,
                                 name in (SLURM, CONDOR_SUBMIT))

    def test_shell_scripts_read_token_file(self):
        _, slurm_token = self.record_slurm_script()
        self.assertEqual(slurm_token, "token-from-file")
        _, condor_token = self.record_condor_wrapper([PLACEHOLDER_URL])
        self.assertEqual(condor_token, "token-from-file")

    # -- workers against a real server --------------------------------------

    @needs_povray
    def test_systemd_worker_renders(self):
        server = self.start_server()
        workdir = os.path.join(self.folder, "state")
        command = [
            word.replace("/opt/httpov/httpov.py",
                         os.path.join(HERE, "httpov.py"))
            .replace("/var/lib/httpov-worker", workdir)
            for word in unit_command(server.url)]
        command[0] = sys.executable
        tasks = parse_work_arguments(self, command[2:]).tasks
        # 'work --tasks N' names its workers HOST-1 to HOST-N.
        names = {"%s-%d" % (socket.gethostname(), slot)
                 for slot in range(1, tasks + 1)} if tasks > 1 else {
                     socket.gethostname()}
        worker = self.start_process(command, {"HTTPOV_TOKEN": server.worker})
        self.check_renders_and_stops(server, worker, names)

    @needs_povray
    def test_slurm_worker_renders(self):
        server = self.start_server()
        worker = self.start_process(
            ["bash", os.path.join(CLUSTER, SLURM)],
            self.slurm_environment(server.url, server.worker))
        self.check_renders_and_stops(server, worker, {"slurm-77-3"})
        self.assertFalse(
            os.path.exists(os.path.join(self.folder, "httpov-worker-80")),
            "the script left its work folder behind")

    @needs_povray
    def test_htcondor_worker_renders(self):
        server = self.start_server()
        scratch = self.condor_scratch()
        commands, _ = submit_commands(read_example(CONDOR_SUBMIT))
        arguments = [word.replace(PLACEHOLDER_URL, server.url) for word in
                     condor_arguments(commands["arguments"])]
        with open(os.path.join(scratch, "worker-token"), "w") as out:
            out.write(server.worker + "\n")
        worker = self.start_process(
            ["sh", os.path.join(scratch, commands["executable"])] +
            arguments, {}, cwd=scratch)
        self.check_renders_and_stops(server, worker, {"condor-1-0"})

    @needs_povray
    def test_kubernetes_worker_renders(self):
        server = self.start_server()
        _, container = kubernetes_worker(kubernetes_documents())
        command = kubernetes_command(container, {
            "HTTPOV_URL": server.url, "POD_NAME": "httpov-worker-pod"})
        mounts = {}
        for mount in container["volumeMounts"]:
            local = os.path.join(self.folder, mount["name"])
            os.makedirs(local)
            os.chmod(local, 0o755)
            mounts[mount["mountPath"]] = local
        shutil.copy(os.path.join(HERE, "httpov.py"),
                    mounts[os.path.dirname(command[1])])
        command = [map_mounted_path(word, mounts) for word in command]
        command[0] = sys.executable
        worker = self.start_process(command, {"HTTPOV_TOKEN": server.worker})
        self.check_renders_and_stops(server, worker, {"httpov-worker-pod"})

    # -- helpers ------------------------------------------------------------

    def start_server(self):
        self.assertTrue(POVRAY, "POV-Ray is required (HTTPOV_CI=1)")
        server = ServerProcess(os.path.join(self.folder, "data"))
        self.addCleanup(server.stop)
        return server

    def start_process(self, command, environment, cwd=None):
        env = dict(os.environ)
        env.pop("HTTPOV_TOKEN", None)
        env.update(environment)
        log_path = os.path.join(self.folder, "worker.log")
        with open(log_path, "a") as log_file:
            # A session of its own lets the cleanup kill a worker that a
            # broken script left behind.
            process = subprocess.Popen(command, stdout=log_file,
                                       stderr=log_file, env=env, cwd=cwd,
                                       start_new_session=True)
        self.addCleanup(self.kill_process_group, process)
        return process

    def kill_process_group(self, process):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()

    def worker_log(self):
        with open(os.path.join(self.folder, "worker.log"),
                  errors="replace") as source:
            return source.read()[-3000:]

    def check_renders_and_stops(self, server, worker, names):
        """Render a small job with ``worker``, then stop it with SIGTERM.

        Every worker that rendered a task must have one of ``names``.
        """
        scene = os.path.join(self.folder, "tiny.pov")
        with open(scene, "wb") as out:
            out.write(TINY_SCENE)
        client = server.client()
        self.addCleanup(client.close)
        job = httpov.submit_job(client, scene, {}, ["+W32", "+H24"])
        job = wait_for_job(client, job["id"], timeout=120)
        self.assertEqual(job["state"], "done", self.worker_log())
        workers = client.call("GET", "/api/workers")["workers"]
        rendered = {entry["name"] for entry in workers
                    if entry["tasks_done"] > 0}
        self.assertTrue(rendered, "no worker rendered a task")
        self.assertLessEqual(rendered, set(names))
        worker.send_signal(signal.SIGTERM)
        try:
            status = worker.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self.fail("worker did not stop within %d s of SIGTERM:\n%s"
                      % (STOP_SECONDS, self.worker_log()))
        self.assertEqual(status, 0, self.worker_log())

    def recording_environment(self):
        """Return an environment whose python3 records its arguments."""
        bin_dir = os.path.join(self.folder, "bin")
        os.makedirs(bin_dir, exist_ok=True)
        python = os.path.join(bin_dir, "python3")
        with open(python, "w") as out:
            out.write(RECORDING_PYTHON)
        os.chmod(python, 0o755)
        env = dict(os.environ)
        env.pop("HTTPOV_TOKEN", None)
        env.update({
            "PATH": bin_dir + os.pathsep + env.get("PATH", ""),
            "RECORD_ARGS": os.path.join(self.folder, "args"),
            "RECORD_TOKEN": os.path.join(self.folder, "token")})
        return env

    def read_recording(self):
        with open(os.path.join(self.folder, "args")) as source:
            arguments = source.read().split("\0")[:-1]
        with open(os.path.join(self.folder, "token")) as source:
            return arguments, source.read()

    def slurm_environment(self, url, token):
        env = dict(os.environ)
        env.pop("HTTPOV_TOKEN", None)
        env.update({
            "HTTPOV_PY": os.path.join(HERE, "httpov.py"),
            "TMPDIR": self.folder, "SLURM_JOB_ID": "80",
            "SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "3",
            "SLURM_CPUS_PER_TASK": "1"})
        if url is not None:
            env["HTTPOV_URL"] = url
        if token is not None:
            env["HTTPOV_WORKER_TOKEN"] = token
        return env

    def record_slurm_script(self):
        """Run the Slurm script with a recording python3 and return the
        arguments and HTTPOV_TOKEN it passed."""
        token_file = os.path.join(self.folder, "worker-token")
        with open(token_file, "w") as out:
            out.write("token-from-file\n")
        env = self.slurm_environment(None, None)
        env.pop("HTTPOV_URL", None)
        env.update(self.recording_environment())
        env["HTTPOV_TOKEN_FILE"] = token_file
        env["HTTPOV_TOKEN"] = "admin-token-of-the-shell"
        result = subprocess.run(
            ["bash", os.path.join(CLUSTER, SLURM)], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            universal_newlines=True, timeout=30)
        self.assertEqual(result.returncode, 0, result.stdout)
        arguments, token = self.read_recording()
        self.assertEqual(arguments[0], os.path.join(HERE, "httpov.py"))
        return arguments, token

    def condor_scratch(self):
        """Make a scratch folder as HTCondor would for one job."""
        scratch = os.path.join(self.folder, "scratch")
        os.makedirs(scratch, exist_ok=True)
        os.chmod(scratch, 0o755)
        commands, _ = submit_commands(read_example(CONDOR_SUBMIT))
        shutil.copy(os.path.join(CLUSTER, commands["executable"]), scratch)
        shutil.copy(os.path.join(HERE, "httpov.py"), scratch)
        return scratch

    def record_condor_wrapper(self, arguments):
        """Run the HTCondor wrapper with a recording python3 and return
        the arguments and HTTPOV_TOKEN it passed."""
        scratch = self.condor_scratch()
        with open(os.path.join(scratch, "worker-token"), "w") as out:
            out.write("token-from-file\n")
        result = subprocess.run(
            ["sh", os.path.join(scratch, CONDOR_WRAPPER)] + arguments,
            env=self.recording_environment(), cwd=scratch,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            universal_newlines=True, timeout=30)
        self.assertEqual(result.returncode, 0, result.stdout)
        recorded, token = self.read_recording()
        self.assertEqual(recorded[0], "httpov.py")
        return recorded, token


if __name__ == "__main__":
    unittest.main()
