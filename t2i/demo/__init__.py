"""The shapes world of the bundled demo model: scenes and captions (`shapes`), the ShapeEval benchmark
(`shapeeval`, run on a pipeline by `evaluation`), and style datasets and metrics for LoRA proofs (`styles`)."""
