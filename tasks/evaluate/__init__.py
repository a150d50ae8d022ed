"""The evaluate stage: generated samples scored with gFID, IS, precision/recall and CLIP score."""
