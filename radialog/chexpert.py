"""The 14 CheXpert labels: the findings vocabulary shared by the classifier (workers), the SR codes and the
approval checklist (reporting), the registry's ``Report.findings`` and the API's quick actions."""

from __future__ import annotations

#: CheXpert label order of the findings classifier's outputs.
CHEXPERT_LABELS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
#: The label that says "nothing found"; never a quick-action finding.
NO_FINDING = "No Finding"
