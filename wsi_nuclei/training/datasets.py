"""Nucleus datasets: MoNuSeg, TNBC and a generic "folder of images + instance masks" (CoNSeP:
:mod:`wsi_nuclei.training.consep`; any of them by kind: :func:`wsi_nuclei.training.evaluate.load_dataset`).

Every loader returns :class:`Sample` values: an RGB image and an instance label map of the same
(H, W), at the image's native resolution (``mpp`` µm per pixel). Resampling to the model's
working resolution happens elsewhere (:func:`wsi_nuclei.imageops.rescale_sample`).

Layouts:

- MoNuSeg: ``<root>/images/<id>.tif`` with either ``<root>/instances/<id>.png`` (16-bit instance
  maps, the training split) or ``<root>/annotations/<id>.xml[.gz]`` (Aperio XML polygons, the test
  split). Instance maps win when both exist.
- TNBC: ``<root>/images/<SS>_<k>.png`` and ``<root>/masks/<SS>_<k>.png`` (binary 0/255); instances
  are the 4-connected components of the mask (touching nuclei stay merged, as in the dataset).
- CoNSeP: see :mod:`wsi_nuclei.training.consep`.
- Folder: ``<root>/images/<stem>.<ext>`` and ``<root>/masks/<stem>.<ext>``; a mask is an integer
  instance map, or a binary mask that is split into connected components.
"""

from __future__ import annotations

import gzip
import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from ..errors import DatasetError
from ..nuclei.instances import relabel_sequential

__all__ = [
    "Sample",
    "IMAGE_EXTENSIONS",
    "MONUSEG_MPP",
    "TNBC_MPP",
    "tcga_organ",
    "read_rgb",
    "read_aperio_xml",
    "read_label_image",
    "list_images",
    "load_monuseg",
    "load_tnbc",
    "load_folder",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
#: MoNuSeg is scanned at 40x; the XMLs say 0.2456-0.2527 µm/px.
MONUSEG_MPP = 0.25
#: TNBC (Naylor et al.) is 40x as well.
TNBC_MPP = 0.25
# TCGA tissue source site (the 2 characters after "TCGA-") -> organ, for the MoNuSeg images.
# Organ names follow the MoNuSeg release (Kumar et al. 2017 call the 18/21/38/49/50 sites "liver").
_TSS_ORGAN: dict[str, str] = {
    "A7": "breast", "AR": "breast", "E2": "breast", "AC": "breast", "AO": "breast",
    "B0": "kidney", "HE": "kidney", "2Z": "kidney", "GL": "kidney", "IZ": "kidney",
    "18": "liver", "21": "liver", "38": "liver", "49": "liver", "50": "liver",
    "44": "lung", "69": "lung",
    "G9": "prostate", "CH": "prostate", "EJ": "prostate", "HC": "prostate",
    "DK": "bladder", "G2": "bladder", "CU": "bladder", "ZF": "bladder",
    "AY": "colon", "NH": "colon", "A6": "colon",
    "KB": "stomach", "RD": "stomach",
    "FG": "brain", "HT": "brain",
}


@dataclass(frozen=True)
class Sample:
    """One annotated image.

    Attributes
    ----------
    name : str
        File stem, unique within its dataset.
    image : np.ndarray
        (H, W, 3) uint8 RGB.
    labels : np.ndarray
        (H, W) int32 instance labels, 0 = background, 1..N nuclei.
    mpp : float
        Microns per pixel of ``image`` and ``labels``.
    group : str
        Organ (MoNuSeg), slide id (TNBC), "consep" or "" (folder): for splits and per-group reports.
    dataset : str
        The dataset it came from ("monuseg", "tnbc", "consep", "folder"): training samples by it.
    types : np.ndarray or None
        (H, W) uint8 nucleus-type map (0 = no type, 1..n = :data:`wsi_nuclei.nuclei.classes.DEFAULT_TYPES`),
        or None when the dataset has no types.
    """

    name: str
    image: np.ndarray
    labels: np.ndarray
    mpp: float
    group: str = ""
    dataset: str = ""
    types: np.ndarray | None = None


def tcga_organ(name: str) -> str:
    """Organ of a MoNuSeg image from its TCGA barcode (``TCGA-A7-A13E-...`` -> ``"breast"``).

    Returns ``"unknown"`` for a barcode whose tissue source site is not in the table.
    """
    parts = Path(name).name.split("-")
    if len(parts) < 2 or parts[0].upper() != "TCGA":
        return "unknown"
    return _TSS_ORGAN.get(parts[1].upper(), "unknown")


def read_rgb(path: Path) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB as a viewer shows it: EXIF orientation applied,
    transparent pixels on white (not black: black would read as nuclei), grey expanded, 16-bit
    scaled. A file of several images (frames, pages) is refused: which one was meant is unknown."""
    from PIL import ImageOps

    try:
        with Image.open(path) as opened:
            frames = int(getattr(opened, "n_frames", 1) or 1)
            if frames > 1:
                raise DatasetError(f"{path}: holds {frames} images (frames or pages); give one image per file "
                                   "(e.g. split the pages), or a slide to `segment`")
            im: Image.Image = ImageOps.exif_transpose(opened) or opened
            if im.mode in ("LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
            if im.mode not in ("RGB", "RGBA", "L", "I;16", "I;16B", "I;16L"):
                im = im.convert("RGB")  # palette, LA, CMYK, ...
            arr = np.asarray(im)
    except (OSError, ValueError) as err:
        try:  # LZW/PackBits TIFFs that Pillow cannot decode
            import tifffile

            arr = tifffile.imread(path)
        except Exception:
            raise DatasetError(f"{path}: cannot read image ({err}); convert it to PNG or TIFF") from err
    if arr.dtype == np.uint16:
        arr = (arr // 257).astype(np.uint8)
    elif arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        raise DatasetError(f"{path}: unsupported pixel type {arr.dtype}; save it as 8-bit RGB")
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise DatasetError(f"{path}: expected an RGB image, got shape {arr.shape}")
    if arr.shape[2] == 4:  # composite over white, like a viewer on a white page
        alpha = arr[:, :, 3:4].astype(np.float32) / 255.0
        return np.asarray(np.round(arr[:, :, :3] * alpha + 255.0 * (1.0 - alpha)), dtype=np.uint8)
    return np.ascontiguousarray(arr)


def read_label_image(path: Path) -> np.ndarray:
    from PIL import ImageOps

    try:
        with Image.open(path) as opened:
            if opened.format == "JPEG":
                raise DatasetError(f"{path}: a JPEG mask (lossy: its ids and edges change); save masks as PNG or TIFF")
            arr = np.asarray(ImageOps.exif_transpose(opened) or opened)  # as its image is oriented (read_rgb)
    except OSError as err:
        raise DatasetError(f"{path}: cannot read mask ({err})") from err
    if arr.ndim == 3:  # an RGB(A) rendering of a binary mask; colour-coded instances are refused
        rgb = arr[:, :, :3]
        if len(np.unique(rgb.reshape(-1, 3), axis=0)) > 2:
            raise DatasetError(f"{path}: colour-coded instance masks are not supported; save ids as a 16-bit grey PNG")
        arr = rgb.max(axis=2)
    if not np.issubdtype(arr.dtype, np.integer) and arr.dtype != bool:
        raise DatasetError(f"{path}: mask must hold integers, got {arr.dtype}")
    return arr


def _components(binary: np.ndarray) -> np.ndarray:
    """4-connected components of a binary mask as int32 labels."""
    labels, _ = ndi.label(binary, structure=ndi.generate_binary_structure(2, 1))
    return np.asarray(labels, dtype=np.int32)


def _as_instances(mask: np.ndarray, path: Path) -> np.ndarray:
    """Instance labels from a mask: binary masks (values {0, v}) become connected components."""
    if mask.min() < 0:
        raise DatasetError(f"{path}: mask has negative values; use 0 for background and 1..N for nuclei")
    values = np.unique(mask)
    if len(values) <= 2:
        return _components(mask > 0)
    return relabel_sequential(mask.astype(np.int32))


def read_aperio_xml(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """Rasterise an Aperio XML (optionally gzipped) of nucleus polygons into (H, W) int32 labels.

    Vertices are (X = column, Y = row) pixel coordinates. Regions are drawn in XML order, a later
    region overwrites an earlier one, regions with fewer than 3 vertices are skipped, and labels
    are renumbered 1..N. This matches the rasterisation of ``monuseg/train/instances``.
    """
    from skimage.draw import polygon

    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            root = ET.parse(fh).getroot()
    except (OSError, ET.ParseError, EOFError) as err:
        raise DatasetError(f"{path}: not a readable Aperio XML ({err})") from err
    labels = np.zeros(shape, dtype=np.int32)
    n = 0
    for region in root.iter("Region"):
        verts = region.findall("./Vertices/Vertex")
        if len(verts) < 3:
            continue
        xs = np.array([float(v.get("X", "nan")) for v in verts])
        ys = np.array([float(v.get("Y", "nan")) for v in verts])
        rr, cc = polygon(ys, xs, shape=shape)
        if len(rr) == 0:
            continue
        n += 1
        labels[rr, cc] = n
    return relabel_sequential(labels)


def _xml_mpp(path: Path) -> float | None:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            for _, elem in ET.iterparse(fh, events=("start",)):
                value = elem.get("MicronsPerPixel")
                return float(value) if value else None
    except (OSError, ET.ParseError, ValueError, EOFError):
        return None
    return None


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise DatasetError(f"{path}: {what} folder not found; check the dataset path")


def list_images(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DatasetError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
    return files


def load_monuseg(root: Path | str, names: list[str] | None = None) -> list[Sample]:
    """Load a MoNuSeg split (``monuseg/train`` or ``monuseg/test``).

    Parameters
    ----------
    root : path
        Split folder holding ``images/`` and ``instances/`` and/or ``annotations/``.
    names : list of str, optional
        Image ids (file stems) to load; default all.
    """
    root = Path(root)
    _require_dir(root / "images", "MoNuSeg images/")
    out = []
    for img_path in list_images(root / "images"):
        stem = img_path.stem
        if names is not None and stem not in names:
            continue
        image = read_rgb(img_path)
        inst = root / "instances" / f"{stem}.png"
        xmls = [root / "annotations" / f"{stem}.xml.gz", root / "annotations" / f"{stem}.xml"]
        xml = next((p for p in xmls if p.is_file()), None)
        if inst.is_file():
            labels = read_label_image(inst).astype(np.int32)
        elif xml is not None:
            labels = read_aperio_xml(xml, image.shape[:2])
        else:
            raise DatasetError(
                f"{img_path}: no instance map ({inst.name}) or XML ({stem}.xml[.gz]) beside it; "
                "add the annotation or remove the image"
            )
        if labels.shape != image.shape[:2]:
            raise DatasetError(f"{img_path}: image {image.shape[:2]} and mask {labels.shape} differ in size")
        mpp = (_xml_mpp(xml) if xml is not None else None) or MONUSEG_MPP
        out.append(Sample(stem, image, labels, mpp, tcga_organ(stem), "monuseg"))
    if names is not None and len(out) != len(set(names)):
        missing = sorted(set(names) - {s.name for s in out})
        raise DatasetError(f"{root}: images not found: {', '.join(missing)}")
    log.info("loaded %d MoNuSeg images from %s", len(out), root)
    return out


def _paired(root: Path, mask_dir: str) -> list[tuple[Path, Path]]:
    _require_dir(root / "images", "images/")
    _require_dir(root / mask_dir, f"{mask_dir}/")
    masks = {p.stem: p for p in list_images(root / mask_dir)}
    pairs = []
    for img in list_images(root / "images"):
        if img.stem not in masks:
            raise DatasetError(f"{img}: no mask {mask_dir}/{img.stem}.* for this image; add it or remove the image")
        pairs.append((img, masks.pop(img.stem)))
    if masks:
        extra = ", ".join(sorted(masks)[:5])
        raise DatasetError(f"{root / mask_dir}: masks without an image: {extra}; remove them or add the images")
    return pairs


def load_tnbc(root: Path | str, limit: int | None = None) -> list[Sample]:
    """Load TNBC (Naylor et al. 2018): binary masks become 4-connected instances.

    ``group`` is the slide/patient id (``"04"`` for ``04_3.png``).
    """
    root = Path(root)
    out = []
    for img_path, mask_path in _paired(root, "masks")[:limit]:
        image = read_rgb(img_path)
        labels = _components(read_label_image(mask_path) > 0)
        if labels.shape != image.shape[:2]:
            raise DatasetError(f"{mask_path}: mask {labels.shape} and image {image.shape[:2]} differ in size")
        out.append(Sample(img_path.stem, image, labels, TNBC_MPP, img_path.stem.split("_")[0], "tnbc"))
    return out


def load_folder(root: Path | str, mpp: float, limit: int | None = None) -> list[Sample]:
    """Load a user's folder: ``images/<stem>.*`` with ``masks/<stem>.*`` instance or binary masks."""
    if not mpp > 0:
        raise DatasetError(f"mpp must be > 0 µm/px, got {mpp}")
    root = Path(root)
    out = []
    for img_path, mask_path in _paired(root, "masks")[:limit]:
        image = read_rgb(img_path)
        labels = _as_instances(read_label_image(mask_path), mask_path)
        if labels.shape != image.shape[:2]:
            raise DatasetError(f"{mask_path}: mask {labels.shape} and image {image.shape[:2]} differ in size")
        out.append(Sample(img_path.stem, image, labels, mpp, "", "folder"))
    return out
