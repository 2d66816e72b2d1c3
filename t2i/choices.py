"""The names a user chooses from, as plain strings, so the CLI's parser (and `t2i --help`) lists them without
importing torch. What each name does lives with the code that acts on it; tests keep the two in step.
"""

DEVICES = ("auto", "cpu", "cuda", "mps")  # t2i.devices.resolve_device (which also takes cuda:N)
DTYPES = ("auto", "fp32", "fp16", "bf16")  # t2i.devices.resolve_dtype

# t2i.speed's options (its OPTION_NAMES; SpeedOptions.parse reads them). "auto" (the default: what measures
# faster on this device at no quality cost) and "exact" (the bit-exact fp32 path) stand alone.
SPEED_MODES = ("auto", "exact")
SPEED_OPTIONS = SPEED_MODES + ("batched", "bf16_weights", "bf16_vae", "channels_last", "sdpa", "no_sdpa", "bf16",
                               "compile", "cacheN[:K]", "attention_slicing", "vae_tiling", "cpu_offload",
                               "tiny_vae[=PATH]")

# `t2i bench`: its prompt, its randomly initialised architectures (t2i.bench.random_models.ARCHS) and the
# options it benches by default: SpeedOptions()'s switches but sdpa, which is how diffusers loads attention anyway
BENCH_PROMPT = "a red circle to the left of a blue square"
BENCH_ARCHS = ("sd15", "sdxl")
BENCH_OPTIONS = ("batched",)

# Hires fix upscalers (t2i.pipelines.hires.UPSCALERS says what each does): t2i name -> A1111's name
HIRES_UPSCALERS = {"latent": "Latent", "latent-antialiased": "Latent (antialiased)",
                   "latent-bicubic": "Latent (bicubic)", "latent-bicubic-antialiased": "Latent (bicubic antialiased)",
                   "latent-nearest": "Latent (nearest)", "latent-nearest-exact": "Latent (nearest-exact)",
                   "lanczos": "Lanczos", "nearest": "Nearest"}
