"""The text modality (see modality.py)."""
