"""Model backends (GPU workers): grounding, SAM, diffusion inpainting, LLM question answering.

Each module registers its Stage classes on import; heavy libraries (torch, transformers,
diffusers, segment-anything) are imported inside constructors so that importing the registry
stays cheap on machines that only run the CPU default.
"""

# issue 19 added instruct (instruction edits), judge (VLM judge), sam3, track (video trackers);
# issue 31 removers (SDXL / FLUX Fill / FLUX.2 klein removal backends)
from counterfactory.stages.models import (  # noqa: F401
    grounding,
    inpaint,
    instruct,
    judge,
    llm,
    removers,
    sam,
    sam3,
    sam3_video,
    track,
    verify,
    video_inpaint,
)
