"""Artifacts on disk: mask-only files (:mod:`.masks`) and pruned model folders."""

from .masks import (
    FORMAT,
    FORMAT_VERSION,
    apply_mask_file,
    apply_masks,
    check_mask_fits,
    load_mask_artifact,
    pack_bits,
    read_mask_header,
    save_mask_artifact,
    save_pruned_model,
    unpack_bits,
)

__all__ = [
    "FORMAT", "FORMAT_VERSION", "apply_mask_file", "apply_masks", "check_mask_fits", "load_mask_artifact",
    "pack_bits", "read_mask_header", "save_mask_artifact", "save_pruned_model", "unpack_bits",
]
