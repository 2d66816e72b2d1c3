"""`t2i bench`: stock diffusers against t2i, plain and with each speed option, on the same modules
(`core`), and randomly initialised models of real architectures to time without weights (`random_models`)."""

from t2i.bench.core import Report, Row, bench, matmul_peak, table, unet_flops, variants

__all__ = ["Report", "Row", "bench", "matmul_peak", "table", "unet_flops", "variants"]
