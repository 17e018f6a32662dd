"""HF checkpoint interop: key maps, fused <-> per-expert experts, MTP layers, conversion (docs/interop.md)."""
