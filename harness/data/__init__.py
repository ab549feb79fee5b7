"""Data formats (NeMo SFT jsonl), prompt rendering and the synthetic task world."""
