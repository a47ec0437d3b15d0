"""What every result object shares: series numbers and descriptions, the algorithm, the device observer."""
from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset

from pacs_landmarks import __version__
from pacs_landmarks.landmark_sets import coding_scheme_identification
from pacs_landmarks.sr_templates.uids import derived_uid, result_uid, sources_digest

MANUFACTURER = "pacs-landmarks"

# Fixed series number and description per kind of result (documented in docs/dicom-conformance.md).
SERIES = {
    "landmark-sr": (7701, "AI Landmarks"),
    "measurements-sr": (7702, "AI Cephalometry"),
    "seg": (7703, "AI Landmark SEG"),
    "gsps": (7704, "AI Landmarks GSPS"),
}


@dataclass(frozen=True)
class Algorithm:
    """The model that produced the landmarks (PS3.16 TID 4019 Algorithm Identification)."""

    name: str
    version: str
    landmark_set: str = "craniofacial16"

    @classmethod
    def of(cls, model) -> "Algorithm":
        return cls(str(model.name), str(model.version), str(getattr(model, "landmark_set", "craniofacial16")))


def sr_algorithm_id(alg: Algorithm):
    from highdicom.sr import AlgorithmIdentification

    return AlgorithmIdentification(name=alg.name, version=alg.version)


def observation_context(alg: Algorithm):
    """Device observer (PS3.16 TID 1004): this software running the named model."""
    from highdicom.sr import DeviceObserverIdentifyingAttributes, ObservationContext, ObserverContext
    from pydicom.sr.codedict import codes

    device = DeviceObserverIdentifyingAttributes(
        uid=derived_uid("device", MANUFACTURER, alg.name, alg.version),
        name=f"{MANUFACTURER} {alg.name}",
        manufacturer_name=MANUFACTURER,
        model_name=alg.name,
    )
    return ObservationContext(
        observer_device_context=ObserverContext(observer_type=codes.cid270.Device, observer_identifying_attributes=device)
    )


def result_uids(volume, kind: str, alg: Algorithm) -> tuple[str, str]:
    """(Series Instance UID, SOP Instance UID) of the ``kind`` result for ``volume``: derived from the source
    series, the exact source instances the volume was built from, the model and the kind (``uids.py``)."""
    series = volume.series_instance_uid
    sources = sources_digest(h.SOPInstanceUID for h in volume.source_headers)
    return tuple(result_uid(series, sources, kind, alg.name, alg.version, what) for what in ("series", "instance"))


def result_identity(volume, kind: str, alg: Algorithm) -> dict[str, object]:
    """The keyword arguments that identify a ``kind`` result in highdicom's constructors: its series (General
    Series, PS3.3 C.7.3.1: the derived UID and the fixed number of ``kind``), its instance (SOP Common, C.12.1;
    one per series) and its manufacturer (General Equipment, C.7.5.1)."""
    number, _ = SERIES[kind]
    series_uid, sop_uid = result_uids(volume, kind, alg)
    return dict(series_instance_uid=series_uid, series_number=number, sop_instance_uid=sop_uid, instance_number=1,
                manufacturer=MANUFACTURER)


def image_result_identity(volume, kind: str, alg: Algorithm) -> dict[str, object]:
    """``result_identity`` and what Enhanced General Equipment (PS3.3 C.7.5.2) adds, which the SEG and GSPS
    IODs require (``finish`` completes it)."""
    return dict(result_identity(volume, kind, alg), manufacturer_model_name=MANUFACTURER,
                software_versions=alg.version, device_serial_number="0")


def reference(ds: Dataset) -> Dataset:
    """The four UIDs that identify a stored object (what a Predecessor Documents Sequence item needs)."""
    ref = Dataset()
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID"):
        setattr(ref, key, str(ds[key].value))
    return ref


def finish(ds: Dataset, kind: str, alg: Algorithm) -> Dataset:
    """Attributes set the same way on every result: description, software, local coding schemes."""
    ds.SeriesDescription = SERIES[kind][1]
    ds.SoftwareVersions = [__version__, f"{alg.name} {alg.version}"]
    ds.ManufacturerModelName = MANUFACTURER
    ds.CodingSchemeIdentificationSequence = coding_scheme_identification(alg.landmark_set)
    _mark_items_encoded(ds)
    return ds


def _mark_items_encoded(ds: Dataset) -> None:
    """Mark every nested item as already in Explicit VR Little Endian, the transfer syntax we write.

    pydicom's writer runs its ambiguous-VR correction (itself recursive) for each item whose original
    encoding differs from the file's, i.e. for every item built in memory: quadratic in the nesting depth of
    an SR content tree. The top level stays unmarked, so the correction still runs once over the whole tree.
    The bytes written are the same (tests/test_sr.py::test_encoding_marks_do_not_change_the_bytes).
    """
    for elem in ds.elements():
        if elem.VR == "SQ":
            for item in elem.value:
                # pydicom 3's charset of an item (its own or its parent's); without it, leave the item as it
                # is: written the same, only slower.
                charset = getattr(item, "_character_set", None)
                if charset is None:
                    return
                item.set_original_encoding(False, True, charset)
                _mark_items_encoded(item)


def evidence_headers(headers: list[Dataset]) -> list[Dataset]:
    """Source headers as highdicom needs them for evidence / references (no pixel data)."""
    out = []
    for h in headers:
        if "PixelData" in h:
            # A new dataset sharing the elements: Dataset.copy() is shallow, and deleting from it would strip
            # the pixels from the caller's dataset too.
            lean = Dataset()
            for elem in h:
                if elem.tag != 0x7FE00010:
                    lean.add(elem)
            if hasattr(h, "file_meta"):
                lean.file_meta = h.file_meta
            h = lean
        out.append(h)
    return out


def sr_document(report, evidence: list[Dataset], kind: str, alg: Algorithm, volume,
                predecessors: list[Dataset] = (), *, three_d: bool = True) -> Dataset:
    """A Comprehensive 3D SR document (PS3.3 A.35.13) around a TID 1500 report built with highdicom; a
    Comprehensive SR (A.35.3) with ``three_d=False``, for content without SCOORD3D (results on a 2D image).

    highdicom's document constructor deep-copies and re-parses the whole content tree, which costs ~0.4 s
    for our 32 landmark groups; the content was already built (and checked) by highdicom's template classes.
    So the document modules are made around the same root container without its groups, and the built
    content is attached afterwards. ``evidence`` must list every instance the content references.

    ``predecessors``: earlier results of the same kind for the same series and model, newest first (see
    ``reference``). The newest one that is not this very document (same input -> same UID) goes into the
    Predecessor Documents Sequence (PS3.3 C.17.2.3): this document replaces it.
    """
    from highdicom.sr import Comprehensive3DSR, ComprehensiveSR

    root = report[0]
    stub = Dataset()
    for elem in root:
        if elem.keyword != "ContentSequence":
            stub.add(elem)
    stub.ContentSequence = []
    identity = result_identity(volume, kind, alg)
    replaced = next((p for p in predecessors if str(p.SOPInstanceUID) != identity["sop_instance_uid"]), None)
    ds = (Comprehensive3DSR if three_d else ComprehensiveSR)(
        evidence=evidence,
        content=stub,
        **identity,
        is_complete=True,
        is_final=False,  # PRELIMINARY: a person verifies the result, not this software
        is_verified=False,
        previous_versions=[replaced] if replaced is not None else None,
    )
    ds.ContentSequence = root.ContentSequence
    return finish(ds, kind, alg)
