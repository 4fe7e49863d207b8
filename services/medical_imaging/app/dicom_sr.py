"""The structured report as a DICOM Comprehensive 3D SR (highdicom) referencing the input study.

The SR goes into the input's study (same Study Instance UID, patient module copied from the input by
highdicom), as a new series; the evaluated images are listed as evidence. Inputs that are not DICOM
have no study to reference and get a 422.
"""

from __future__ import annotations

import copy
import io
import warnings
from typing import Any

from services.medical_imaging.app.inputs import InputError, Study


def _with_uids(refs: list[Any], anon_id: str) -> list[Any]:
    """Copies of the input headers; UIDs that an anonymiser blanked are filled deterministically."""
    from pydicom.uid import generate_uid

    out = []
    study_uid = str(refs[0].get("StudyInstanceUID", "") or "") or generate_uid(
        entropy_srcs=[anon_id, "study"]
    )
    series_uid = str(refs[0].get("SeriesInstanceUID", "") or "") or generate_uid(
        entropy_srcs=[anon_id, "series"]
    )
    for i, ds in enumerate(refs):
        d = copy.deepcopy(ds)
        d.StudyInstanceUID = study_uid
        d.SeriesInstanceUID = series_uid
        if not str(d.get("SOPInstanceUID", "") or ""):
            d.SOPInstanceUID = generate_uid(entropy_srcs=[anon_id, "sop", str(i)])
        if not str(d.get("SOPClassUID", "") or ""):
            d.SOPClassUID = getattr(getattr(d, "file_meta", None), "MediaStorageSOPClassUID", "") or (
                "1.2.840.10008.5.1.4.1.1.2" if d.get("Modality") == "CT" else "1.2.840.10008.5.1.4.1.1.7"
            )
        for attr in (
            "PatientID",
            "PatientName",
            "PatientBirthDate",
            "PatientSex",
            "StudyDate",
            "StudyTime",
            "AccessionNumber",
            "ReferringPhysicianName",
            "StudyID",
        ):
            if attr not in d:
                setattr(d, attr, "")
        out.append(d)
    return out


def build_sr(study: Study, report: dict[str, Any]) -> bytes:
    """Encode the report as a Comprehensive 3D SR Part-10 file."""
    import highdicom as hd
    from highdicom.sr import (
        CodeContentItem,
        CodedConcept,
        ContainerContentItem,
        NumContentItem,
        TextContentItem,
    )
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    if not study.dicom_refs:
        raise InputError("dicom_sr_needs_dicom", "a DICOM SR references a DICOM study; send DICOM input", 422)
    evidence = _with_uids(study.dicom_refs, study.anon_id)
    finding = report["finding"]
    unc = report.get("uncertainty") or {}
    model = report["model"]
    prob_unit = CodedConcept("1", "UCUM", "no units")
    root = ContainerContentItem(name=CodedConcept("18748-4", "LN", "Diagnostic imaging report"))
    items = [
        CodeContentItem(
            name=CodedConcept("121071", "DCM", "Finding"),
            value=CodedConcept(
                "POS" if finding.get("positive") else "NEG",
                "99MEDIMG",
                str(finding["label"])[:64],
            ),
            relationship_type="CONTAINS",
        ),
        NumContentItem(
            name=CodedConcept("PROB", "99MEDIMG", "Finding probability"),
            value=float(finding["probability"]),
            unit=prob_unit,
            relationship_type="CONTAINS",
        ),
        TextContentItem(
            name=CodedConcept("121106", "DCM", "Comment"),
            value=("Needs radiologist review: " + "; ".join(report["review_reasons"]))[:1024]
            if report["needs_review"]
            else "No review flag raised by the uncertainty checks.",
            relationship_type="CONTAINS",
        ),
        TextContentItem(
            name=CodedConcept("111001", "DCM", "Algorithm Name"),
            value=f"{model['family']} {model['name']}",
            relationship_type="CONTAINS",
        ),
        TextContentItem(
            name=CodedConcept("111003", "DCM", "Algorithm Version"),
            value=str(model["version"]),
            relationship_type="CONTAINS",
        ),
        TextContentItem(
            name=CodedConcept("TRAIN", "99MEDIMG", "Training data"),
            value=str(model["trained_on"])[:1024],
            relationship_type="CONTAINS",
        ),
    ]
    if unc:
        for code, meaning, value in (
            ("PSTD", "Probability standard deviation", unc["std"]),
            ("PENT", "Predictive entropy", unc["predictive_entropy"]),
            ("PLO95", "Probability 95% interval lower bound", unc["interval_95"][0]),
            ("PHI95", "Probability 95% interval upper bound", unc["interval_95"][1]),
        ):
            items.append(
                NumContentItem(
                    name=CodedConcept(code, "99MEDIMG", meaning),
                    value=float(value),
                    unit=prob_unit,
                    relationship_type="CONTAINS",
                )
            )
    root.ContentSequence = items
    _ = codes  # pydicom's code dictionary is imported so highdicom resolves standard codes offline
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sr = hd.sr.Comprehensive3DSR(
            evidence=evidence,
            content=root,
            series_instance_uid=generate_uid(),
            series_number=990,
            sop_instance_uid=generate_uid(),
            instance_number=1,
            manufacturer="moe-domain-services medical_imaging",
            is_complete=True,
        )
        buf = io.BytesIO()
        sr.save_as(buf)
    return buf.getvalue()
