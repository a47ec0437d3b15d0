"""Drive the real OHIF in headless Debian chromium (Playwright from PyPI) and report what it drew, as JSON.

Run by tests/test_ohif.py inside Orthanc's private network namespace (so the browser, the viewer server and
Orthanc all talk over that namespace's loopback only):

    python tests/ohif_driver.py --orthanc http://127.0.0.1:18042 --study UID --sr SERIES_UID
        --seg SERIES_UID --msr SERIES_UID --slices SOP_UID... --expect points.json --out DIR

Serves the pinned OHIF build (pacs_landmarks.viewer), opens the study in the basic viewer, opens the landmark
SR (double click on its thumbnail, as a user does), visits each referenced slice and records for every drawn
SR annotation: its label lines, the arrow tip on the canvas, OHIF's worldToCanvas of its point and the
canvas scale, and OHIF's worldToCanvas of where the test says the point is; then opens the SEG and records its segments' labels. Page errors and console errors are
recorded too. The test decides what passes; this script only measures. Exit 0 when it could measure,
1 with a message on stderr when the browser or the viewer could not run at all.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
# Software WebGL (SwiftShader) without a GPU or display; --no-sandbox because tests run as root in CI.
CHROMIUM_ARGS = [
    "--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--disable-quic",
    "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage",
]
VIEWPORT = {"width": 1280, "height": 900}
# The viewport the user works in (the SR opens in the active one).
_ACTIVE_VIEWPORT_JS = """
window.activeViewport = () => {
  const {activeViewportId} = window.services.viewportGridService.getState();
  return window.cornerstone.getRenderingEngines()[0].getViewport(activeViewportId);
};
"""

# In the page: every DICOMSRDisplay annotation of the active viewport's current image, with OHIF's own
# worldToCanvas of its point, the drawn arrow tip and label text from the SVG layer.
_MEASURE_JS = """
(expected) => {
  const vp = activeViewport();
  const imageId = vp.getCurrentImageId();
  const svg = vp.element.querySelector('svg.svg-layer');
  const coords = l => [+l.getAttribute('x1'), +l.getAttribute('y1'), +l.getAttribute('x2'), +l.getAttribute('y2')];
  // cornerstone keeps the drawn SVG nodes by "<annotation UID>::line::<n>" (when its state is exported).
  const cache = window.cornerstoneTools.state?.svgNodeCache || {};
  const w0 = vp.canvasToWorld([0, 0]), w1 = vp.canvasToWorld([100, 0]);
  const out = [];
  for (const a of window.cornerstoneTools.annotation.state.getAllAnnotations()) {
    if (a.metadata.toolName !== 'DICOMSRDisplay') continue;
    const g = svg.querySelector(`g[data-annotation-uid="${a.annotationUID}"]`);
    const cached = [];
    for (const nodes of Object.values(cache)) {
      for (const [key, node] of Object.entries(nodes)) {
        if (key.startsWith(`${a.annotationUID}::line::`) && node.domRef.isConnected) cached.push(coords(node.domRef));
      }
    }
    out.push({
      uid: a.annotationUID,
      onThisImage: a.metadata.referencedImageId === imageId,
      point: [...a.data.handles.points[0]],
      canvas: [...vp.worldToCanvas(a.data.handles.points[0])],
      expectedCanvas: expected[a.annotationUID] ? [...vp.worldToCanvas(expected[a.annotationUID])] : null,
      cachedLines: cached,
      texts: g ? [...g.querySelectorAll('text tspan')].map(t => t.textContent) : [],
      labels: (a.data.labels || []).map(l => [l.label, l.value]),
    });
  }
  return {
    imageId,
    mmPerCanvasPx: Math.hypot(w1[0] - w0[0], w1[1] - w0[1], w1[2] - w0[2]) / 100,
    annotations: out,
    cacheExported: !!window.cornerstoneTools.state?.svgNodeCache,
  };
}
"""


def _tree_rss_mb(root: int) -> float:
    """Resident memory of ``root`` and all its descendants (the Playwright driver, chromium's processes), MB."""
    parent, rss = {}, {}
    for stat in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in stat.read_text().splitlines() if ":" in line)
        except OSError:
            continue  # the process ended meanwhile
        pid = int(stat.parent.name)
        parent[pid] = int(fields.get("PPid", "0"))
        rss[pid] = int(fields.get("VmRSS", "0 kB").split()[0])
    total, stack = 0, [root]
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total / 1024


class _PeakMemory(threading.Thread):
    """Samples the memory of this process tree twice a second; ``peak_mb`` is the largest sum seen."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak_mb = 0.0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.5):
            self.peak_mb = max(self.peak_mb, _tree_rss_mb(os.getpid()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--orthanc", required=True)
    parser.add_argument("--study", required=True)
    parser.add_argument("--sr", required=True, help="Series Instance UID of the landmark SR")
    parser.add_argument("--seg", required=True, help="Series Instance UID of the SEG")
    parser.add_argument("--msr", required=True, help="Series Instance UID of the measurements SR")
    parser.add_argument("--slices", nargs="+", required=True, help="SOP Instance UIDs to visit")
    parser.add_argument("--expect", type=Path, required=True,
                        help="JSON {tracking UID: [x, y, z]}: where each SR point is in the patient frame (mm)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds for each wait in the page")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    expected = json.loads(args.expect.read_text())

    from pacs_landmarks.viewer.ohif import dist_dir, is_installed
    from pacs_landmarks.viewer.server import make_server, serve_in_thread, url_of

    if not is_installed():
        print(f"the OHIF build is not in {dist_dir()}: run scripts/bootstrap", file=sys.stderr)
        return 1
    if not Path(CHROMIUM).exists():
        print(f"{CHROMIUM} not found: run scripts/bootstrap (it installs Debian's chromium)", file=sys.stderr)
        return 1
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("the playwright package is missing: run scripts/bootstrap (test extra)", file=sys.stderr)
        return 1

    server = make_server(dist_dir(), args.orthanc, "127.0.0.1", 0)
    serve_in_thread(server)
    base = url_of(server)
    report: dict = {"page_errors": [], "console_errors": [], "visits": [], "timings": {}}
    t0 = time.monotonic()
    memory = _PeakMemory()
    memory.start()
    ms = int(args.timeout * 1000)
    try:
        with sync_playwright() as pw:
            try:
                browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            except Exception as exc:  # noqa: BLE001  (any launch failure: report it clearly)
                print(f"chromium did not start: {exc}", file=sys.stderr)
                return 1
            page = browser.new_page(viewport=VIEWPORT)
            page.on("pageerror", lambda exc: report["page_errors"].append(str(exc)))
            page.on("console", lambda msg: msg.type == "error" and report["console_errors"].append(msg.text))
            # The onboarding tour would cover the viewer.
            page.add_init_script("localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']))")
            page.add_init_script(_ACTIVE_VIEWPORT_JS)
            page.goto(f"{base}basic?StudyInstanceUIDs={args.study}", timeout=ms)
            ds_js = """(uid) => (window.services?.displaySetService.getActiveDisplaySets() || [])
                .filter(d => d.SeriesInstanceUID === uid).map(d => d.displaySetInstanceUID)"""
            page.wait_for_function(f"({ds_js})('{args.sr}').length > 0", timeout=ms)
            page.wait_for_function(
                "() => { const e = window.cornerstone?.getRenderingEngines()?.[0];"
                " const v = e && e.getViewports()[0]; return v && v.getCurrentImageId && v.getCurrentImageId(); }",
                timeout=ms,
            )
            report["timings"]["study_open_s"] = round(time.monotonic() - t0, 1)
            page.screenshot(path=str(args.out / "study.png"))

            # Open the landmark SR as a user does: double click on its thumbnail.
            sr_ds = page.evaluate(ds_js, args.sr)[0]
            page.dblclick(f'[id="thumbnail-{sr_ds}"]', timeout=ms)
            page.wait_for_function(
                "() => window.cornerstoneTools.annotation.state.getAllAnnotations()"
                ".some(a => a.metadata.toolName === 'DICOMSRDisplay')",
                timeout=ms,
            )
            report["timings"]["sr_open_s"] = round(time.monotonic() - t0, 1)
            sr_set = page.evaluate(
                """(uid) => { const d = window.services.displaySetService.getDisplaySetByUID(uid);
                     return {measurements: d.measurements.length, loaded: d.measurements.filter(m => m.loaded).length,
                             labels: d.measurements.map(m => [m.TrackingIdentifier, (m.labels || []).map(l => [l.label, l.value])])}; }""",
                sr_ds,
            )
            report["sr_display_set"] = sr_set

            for n, sop in enumerate(args.slices):
                moved = page.evaluate(
                    """async (sop) => { const vp = activeViewport();
                         const i = vp.getImageIds().findIndex(id => id.includes(`/instances/${sop}/`));
                         if (i < 0) return -1;
                         await vp.setImageIdIndex(i); vp.render(); return i; }""",
                    sop,
                )
                if moved < 0:
                    report["visits"].append({"sop": sop, "error": "slice not in the SR viewport's stack"})
                    continue
                # The SVG layer is redrawn after the image renders: wait until an annotation of this image is drawn.
                try:
                    page.wait_for_function(
                        """() => { const id = activeViewport().getCurrentImageId();
                             return window.cornerstoneTools.annotation.state.getAllAnnotations().some(a =>
                               a.metadata.referencedImageId === id &&
                               activeViewport().element.querySelector(`svg.svg-layer g[data-annotation-uid="${a.annotationUID}"]`)); }""",
                        timeout=10000,
                    )
                except Exception:  # noqa: BLE001  (nothing drawn: the test reports which landmark is missing)
                    visit_note = "no annotation drawn within 10 s"
                else:
                    visit_note = None
                page.wait_for_timeout(200)
                visit = page.evaluate(_MEASURE_JS, expected)
                visit["sop"] = sop
                visit["imageIndex"] = moved
                visit["note"] = visit_note
                visit["screenshot"] = f"slice-{n:02d}.png"
                page.screenshot(path=str(args.out / visit["screenshot"]))
                report["visits"].append(visit)
            report["timings"]["slices_s"] = round(time.monotonic() - t0, 1)

            # The SEG: double click on its thumbnail; OHIF loads it as a segmentation of the CT.
            seg_ds = page.evaluate(ds_js, args.seg)
            report["seg_display_sets"] = len(seg_ds)
            if seg_ds:
                page.dblclick(f'[id="thumbnail-{seg_ds[0]}"]', timeout=ms)
                try:
                    page.wait_for_function(
                        "() => (window.services.segmentationService.getSegmentations() || []).length > 0",
                        timeout=ms,
                    )
                except Exception as exc:  # noqa: BLE001
                    report["seg_error"] = str(exc).splitlines()[0]
                # OHIF asks before it turns the SEG into an editable segmentation: answer as a user does.
                try:
                    page.get_by_role("button", name="Yes").click(timeout=10000)
                    report["seg_confirmed"] = True
                except Exception:  # noqa: BLE001
                    report["seg_confirmed"] = False
                page.wait_for_timeout(1500)
                report["segmentations"] = page.evaluate(
                    """() => (window.services.segmentationService.getSegmentations() || []).map(s => ({
                         label: s.label, segments: Object.values(s.segments || {}).filter(Boolean)
                           .map(g => ({index: g.segmentIndex, label: g.label})) }))"""
                )
                page.screenshot(path=str(args.out / "seg.png"))
            # The measurements SR: OHIF shows it as a document; it must open without error.
            msr_ds = page.evaluate(ds_js, args.msr)
            report["msr_display_sets"] = len(msr_ds)
            if msr_ds:
                page.dblclick(f'[id="thumbnail-{msr_ds[0]}"]', timeout=ms)
                page.wait_for_timeout(3000)
                page.screenshot(path=str(args.out / "msr.png"))
            report["timings"]["total_s"] = round(time.monotonic() - t0, 1)
            browser.close()
    finally:
        memory.done.set()
        report["peak_memory_mb"] = round(memory.peak_mb)
        server.shutdown()
        server.server_close()
        (args.out / "report.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
