"""The notebooks: build them, check them, and the example pictures they draw on.

Every notebook has two files in ``notebooks/``:

* ``NN_name.py``, the source of truth, in jupytext's ``py:percent`` format (plain text,
  reviewable diffs);
* ``NN_name.ipynb``, the same cells *executed*, with their outputs and figures, for
  readers on GitHub or in Jupyter.

Commands (run from anywhere; ``names`` are stems such as ``01`` or
``01_bilinear_sampling``, all notebooks when omitted)::

    python -m minidetr.lessons.notebooks build [names]   # .py -> executed .ipynb (full setting)
    python -m minidetr.lessons.notebooks check [names]   # every .ipynb paired, executed, small
    python -m minidetr.lessons.notebooks images          # rebuild notebooks/images/ from
                                                      # ../shared/data/coco128

The kernel. Notebooks run in the *running* interpreter's environment: the kernel is
ipykernel's built-in ``python3`` spec, which starts ``sys.executable -m
ipykernel_launcher``. Kernel specs installed elsewhere (``~/.local/share/jupyter``, a
system Jupyter) are deliberately not consulted, so a fresh virtual environment works
without ``ipykernel install`` and can never pick another Python.

The setting. ``MINIDETR_NOTEBOOK_PRESET=tiny`` in the kernel's environment makes every
notebook shrink its sizes and steps (the test suite uses it); ``build`` removes the
variable, so the committed outputs come from the full setting.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO / "notebooks"
IMAGES = NOTEBOOKS / "images"
PRESET_VARIABLE = "MINIDETR_NOTEBOOK_PRESET"
MAX_NOTEBOOK_BYTES = 1_500_000            # a committed .ipynb stays small
CELL_TIMEOUT_S = 600

# The bundled pictures: COCO train2017 images whose Flickr licence allows derivatives and
# commercial use (4 Attribution, 5 Attribution-ShareAlike, 7 No known copyright
# restrictions), downscaled. Order = index for load_example().
EXAMPLE_IMAGE_IDS = (72, 471, 599, 73, 542)    # giraffes, bus, cat, motorcycle, airplane
ALLOWED_LICENSES = (4, 5, 7)
EXAMPLE_LONGEST_SIDE = 384
JPEG_QUALITY = 85


# --------------------------------------------------------------------------- sources
def notebook_sources(names=None, folder=NOTEBOOKS):
    """The jupytext sources ``notebooks/NN_*.py``, sorted; ``names`` selects some of them.

    A name matches a stem exactly (``01_bilinear_sampling``) or by its number prefix
    (``01``); a ``.py``/``.ipynb`` suffix is ignored. Unknown names raise ValueError.
    """
    folder = Path(folder)
    sources = sorted(p for p in folder.glob("[0-9][0-9]_*.py"))
    if not names:
        return sources
    chosen = []
    for name in names:
        stem = Path(name).name.removesuffix(".py").removesuffix(".ipynb")
        hits = [p for p in sources if p.stem == stem or p.stem.split("_", 1)[0] == stem]
        if not hits:
            raise ValueError(f"no notebook source matches {name!r} in {folder}; known: "
                             f"{[p.stem for p in sources]}")
        chosen.extend(h for h in hits if h not in chosen)
    return chosen


def read_source(py_path):
    """The notebook of a ``py:percent`` source (a ``nbformat`` NotebookNode, no outputs)."""
    import jupytext

    nb = jupytext.read(str(py_path), fmt="py:percent")
    # the kernel that build() uses; written into the .ipynb so Jupyter picks the same one
    nb.metadata["kernelspec"] = {"display_name": "Python 3 (ipykernel)",
                                 "language": "python", "name": "python3"}
    return nb


# --------------------------------------------------------------------------- kernel
def kernel_spec_manager():
    """A KernelSpecManager that knows only ipykernel's built-in spec of this interpreter.

    With no kernel directories, ``python3`` resolves to ipykernel's native spec, whose
    command is ``[sys.executable, "-m", "ipykernel_launcher", ...]``.
    """
    from jupyter_client.kernelspec import KernelSpecManager

    return KernelSpecManager(kernel_dirs=[])


def kernel_command():
    """The command line that starts the notebooks' kernel (its first item is the Python)."""
    return list(kernel_spec_manager().get_kernel_spec("python3").argv)


def kernel_environment(preset=None, environ=None):
    """The environment of the kernel: ours, with the notebook setting and the package path.

    ``preset``: ``"tiny"`` (tests) or ``None`` (the full setting: the variable removed).
    ``MPLBACKEND`` is removed so that ipykernel selects Matplotlib's inline backend.
    The repository root leads ``PYTHONPATH`` so the kernel imports this checkout's
    ``minidetr`` even without an installed package.
    """
    env = dict(os.environ if environ is None else environ)
    env.pop("MPLBACKEND", None)
    env.pop(PRESET_VARIABLE, None)
    if preset is not None:
        env[PRESET_VARIABLE] = str(preset)
    path = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + path if path else "")
    return env


def execute(nb, cwd=NOTEBOOKS, preset=None, timeout=CELL_TIMEOUT_S):
    """Run every cell of ``nb`` top to bottom in a fresh kernel; returns ``nb`` with outputs.

    ``cwd`` is the kernel's working directory (``notebooks/``, so ``images/...`` resolves).
    A failing cell raises ``nbclient.exceptions.CellExecutionError`` naming the cell and
    showing its traceback.
    """
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    with tempfile.TemporaryDirectory(prefix="minidetr-kernel-") as sockets:
        # Local Unix sockets where there are some (no open TCP ports, no ipykernel
        # warning about unencrypted TCP); TCP on localhost elsewhere.
        transport = {"transport": "ipc", "ip": os.path.join(sockets, "kernel")} \
            if os.name == "posix" else {}
        km = KernelManager(kernel_name="python3", kernel_spec_manager=kernel_spec_manager(),
                           **transport)
        client = NotebookClient(nb, km=km, timeout=timeout, record_timing=False,
                                resources={"metadata": {"path": str(cwd)}})
        try:
            client.execute(env=kernel_environment(preset))
        finally:                          # a kernel manager we pass in is ours to stop
            if km.has_kernel:
                km.shutdown_kernel(now=True)
    return nb


# --------------------------------------------------------------------------- build/check
def build(py_path, preset=None, out_path=None):
    """Convert one source to ``.ipynb``, execute it and write it; returns the path written.

    ``out_path`` defaults to the paired ``.ipynb`` beside the source.
    """
    import jupytext

    py_path = Path(py_path)
    nb = execute(read_source(py_path), cwd=py_path.parent, preset=preset)
    out_path = Path(out_path) if out_path else py_path.with_suffix(".ipynb")
    jupytext.write(nb, str(out_path), fmt="ipynb")
    return out_path


def _cells(nb):
    return [(cell.cell_type, cell.source.strip()) for cell in nb.cells]


def pairing_problems(py_path):
    """What is wrong with the ``.ipynb`` paired with ``py_path``; an empty list if nothing.

    Checked: the ``.ipynb`` exists; its cells (type and text) equal the source's; every
    code cell was executed (has an execution count) and none shows an error; the notebook
    has outputs; it weighs less than ``MAX_NOTEBOOK_BYTES``.
    """
    import nbformat

    py_path = Path(py_path)
    ipynb = py_path.with_suffix(".ipynb")
    rebuild = f"rebuild it: python -m minidetr.lessons.notebooks build {py_path.stem}"
    if not ipynb.is_file():
        return [f"{ipynb.name} is missing; {rebuild}"]
    problems = []
    executed = nbformat.read(str(ipynb), as_version=4)
    source, built = _cells(read_source(py_path)), _cells(executed)
    if source != built:
        first = next((i for i, (a, b) in enumerate(zip(source, built)) if a != b),
                     min(len(source), len(built)))
        problems.append(f"{ipynb.name} is out of date with {py_path.name}: the cells differ "
                        f"from cell {first} on ({len(source)} cells in the source, "
                        f"{len(built)} in the notebook); {rebuild}")
    code = [c for c in executed.cells if c.cell_type == "code"]
    not_run = [i for i, c in enumerate(executed.cells)
               if c.cell_type == "code" and c.get("execution_count") is None]
    if not_run:
        problems.append(f"{ipynb.name}: code cells {not_run} were not executed; {rebuild}")
    errors = [i for i, c in enumerate(executed.cells) if c.cell_type == "code"
              and any(o.get("output_type") == "error" for o in c.get("outputs", []))]
    if errors:
        problems.append(f"{ipynb.name}: cells {errors} show an error")
    if not any(c.get("outputs") for c in code):
        problems.append(f"{ipynb.name} has no outputs; {rebuild}")
    size = ipynb.stat().st_size
    if size > MAX_NOTEBOOK_BYTES:
        problems.append(f"{ipynb.name} is {size / 1e6:.2f} MB, more than "
                        f"{MAX_NOTEBOOK_BYTES / 1e6:.1f} MB: lower the figures' dpi or size")
    return problems


# --------------------------------------------------------------------------- pictures
class ExampleImage(NamedTuple):
    """One bundled picture and its objects (boxes already scaled to the stored size).

    Shapes:
        image   (H, W, 3) float32 in [0, 1]
        boxes   (T, 4) float32 corners (x0, y0, x1, y1) in pixels of ``image``
        labels  T category names, e.g. "giraffe"
    """
    image_id: int
    image: np.ndarray
    boxes: np.ndarray
    labels: list


def example_annotations(folder=IMAGES):
    """The COCO-format dict of ``notebooks/images/annotations.json``."""
    with open(Path(folder) / "annotations.json", encoding="utf-8") as f:
        return json.load(f)


def load_example(index=0, folder=IMAGES, include_crowd=False):
    """The ``index``-th bundled picture (see ``EXAMPLE_IMAGE_IDS``) as an ExampleImage."""
    from PIL import Image

    data = example_annotations(folder)
    if not 0 <= index < len(data["images"]):
        raise ValueError(f"load_example: index must be in [0, {len(data['images'])}), "
                         f"got {index}")
    info = data["images"][index]
    names = {c["id"]: c["name"] for c in data["categories"]}
    anns = [a for a in data["annotations"] if a["image_id"] == info["id"]
            and (include_crowd or not a.get("iscrowd", 0))]
    boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)],
                     dtype=np.float32).reshape(-1, 4)                    # (T, 4) x0 y0 x1 y1
    with Image.open(Path(folder) / info["file_name"]) as im:
        image = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
    return ExampleImage(info["id"], image, boxes, [names[a["category_id"]] for a in anns])


def example_to_sample(example, transform, class_names=None):
    """A bundled picture (:func:`load_example`) through the data ``transform``.

    Args:
        example: an :class:`ExampleImage` (image (H, W, 3) in [0, 1], boxes xyxy pixels,
            labels as category names).
        transform: the data transforms, ending with ``Normalize`` (e.g.
            ``Compose([Resize(250, max_size=375), Normalize()])``).
        class_names: the model's classes; label ``i`` is ``class_names.index(name)``.
            None labels every object 0 (when the labels do not matter).

    Returns:
        ``(image (3, h, w) float32, target)`` as the dataset gives it: the target has
        ``boxes`` (T, 4) normalised cxcywh, ``labels`` (T,) int64 and ``size`` (h, w);
        a list of these is what :func:`minidetr.data.collate` batches.
    """
    from PIL import Image

    picture = Image.fromarray(np.uint8(np.rint(np.asarray(example.image) * 255)))
    labels = [class_names.index(name) for name in example.labels] if class_names \
        else [0] * len(example.labels)
    return transform(picture, {"boxes": np.asarray(example.boxes, np.float32),
                               "labels": np.asarray(labels, np.int64)})


def make_example_images(coco_dir=REPO.parent / "shared" / "data" / "coco128", out=IMAGES,
                        image_ids=EXAMPLE_IMAGE_IDS, longest_side=EXAMPLE_LONGEST_SIDE):
    """Write the bundled pictures, their annotations and ATTRIBUTION.md into ``out``.

    Each image is resized (Lanczos) so its longest side is ``longest_side`` pixels and
    saved as JPEG (quality 85); its boxes and areas are scaled by the same factors;
    segmentations are left out. Only licences 4, 5 and 7 are accepted.
    """
    from PIL import Image

    coco_dir, out = Path(coco_dir), Path(out)
    with open(coco_dir / "annotations" / "instances_train2017.json", encoding="utf-8") as f:
        coco = json.load(f)
    images = {im["id"]: im for im in coco["images"]}
    licenses = {lic["id"]: lic for lic in coco["licenses"]}
    categories = {c["id"]: c for c in coco["categories"]}
    out.mkdir(parents=True, exist_ok=True)
    kept_images, kept_anns, used_cats, used_lics = [], [], set(), set()
    for image_id in image_ids:
        info = images.get(image_id)
        if info is None:
            raise ValueError(f"image id {image_id} is not in {coco_dir}")
        if info["license"] not in ALLOWED_LICENSES:
            raise ValueError(f"image {image_id} has licence {info['license']} "
                             f"({licenses[info['license']]['name']}); only "
                             f"{ALLOWED_LICENSES} may be bundled")
        with Image.open(coco_dir / "images" / info["file_name"]) as im:
            im = im.convert("RGB")
            scale = longest_side / max(im.size)
            size = (round(im.width * scale), round(im.height * scale))
            im.resize(size, Image.Resampling.LANCZOS).save(out / info["file_name"],
                                                            quality=JPEG_QUALITY)
        sx, sy = size[0] / info["width"], size[1] / info["height"]
        kept_images.append({"id": image_id, "file_name": info["file_name"], "width": size[0],
                            "height": size[1], "license": info["license"],
                            "flickr_url": info["flickr_url"], "coco_url": info["coco_url"],
                            "original_size": [info["width"], info["height"]]})
        used_lics.add(info["license"])
        for a in coco["annotations"]:
            if a["image_id"] != image_id:
                continue
            x, y, w, h = a["bbox"]
            kept_anns.append({"id": a["id"], "image_id": image_id,
                              "category_id": a["category_id"], "iscrowd": a["iscrowd"],
                              "bbox": [round(x * sx, 2), round(y * sy, 2),
                                       round(w * sx, 2), round(h * sy, 2)],
                              "area": round(a["area"] * sx * sy, 2)})
            used_cats.add(a["category_id"])
    data = {"info": {"description": "minidetr notebook pictures: COCO train2017 images, "
                                    f"downscaled to {longest_side} px (longest side), "
                                    "boxes scaled to match; see ATTRIBUTION.md"},
            "licenses": [licenses[i] for i in sorted(used_lics)],
            "images": kept_images, "annotations": kept_anns,
            "categories": [categories[i] for i in sorted(used_cats)]}
    with open(out / "annotations.json", "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
    _write_attribution(out / "ATTRIBUTION.md", kept_images, licenses, longest_side)
    return out


def _write_attribution(path, images, licenses, longest_side):
    lines = ["# Pictures used by the notebooks", "",
             "Images from the COCO 2017 train set (https://cocodataset.org), each under its "
             "own Flickr licence, listed below. All were **downscaled** (longest side "
             f"{longest_side} px, JPEG quality {JPEG_QUALITY}) by "
             "`python -m minidetr.lessons.notebooks images`; nothing else was changed.",
             "`annotations.json` holds their COCO annotations (CC BY 4.0, COCO Consortium) "
             "with the boxes and areas scaled to the stored size and the segmentations "
             "left out.", "",
             "| file | COCO id | source (Flickr) | licence |", "|---|---|---|---|"]
    for im in images:
        lic = licenses[im["license"]]
        lines.append(f"| {im['file_name']} | {im['id']} | {im['flickr_url']} | "
                     f"[{lic['name']}]({lic['url']}) |")
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- CLI
def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minidetr.lessons.notebooks",
                                     description="Build and check the notebooks.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_build = sub.add_parser("build", help="convert .py -> .ipynb and execute (full setting)")
    p_build.add_argument("names", nargs="*", help="e.g. 01 or 01_bilinear_sampling; all if none")
    p_check = sub.add_parser("check", help="verify every .ipynb is paired, executed, small")
    p_check.add_argument("names", nargs="*")
    p_images = sub.add_parser("images", help="rebuild notebooks/images from coco128")
    p_images.add_argument("--coco", default=str(REPO.parent / "shared" / "data" / "coco128"))
    args = parser.parse_args(argv)

    if args.command == "images":
        print(f"wrote {make_example_images(args.coco)}")
        return 0
    sources = notebook_sources(args.names)
    if not sources:
        print(f"no notebook sources in {NOTEBOOKS}", file=sys.stderr)
        return 1
    if args.command == "build":
        import time
        print(f"kernel: {' '.join(kernel_command()[:3])}")
        for py in sources:
            start = time.perf_counter()
            path = build(py)
            print(f"built {path.relative_to(REPO)} in {time.perf_counter() - start:.1f} s "
                  f"({path.stat().st_size / 1e3:.0f} kB)")
        return 0
    failed = 0
    for py in sources:
        problems = pairing_problems(py)
        failed += bool(problems)
        print(f"{'ok  ' if not problems else 'FAIL'} {py.name}")
        for p in problems:
            print(f"     {p}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
