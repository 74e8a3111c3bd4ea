"""Video backends of the six stages (``backend: video``): one sample per clip, same contract.

Arrays: ``video`` (T x H x W x 3 uint8), ``masks_core`` / ``masks`` (T x H x W uint8 0/1: the
evidence on every frame, exact and dilated), ``labels`` (T x H x W uint8: track id + 1),
``variant/<v>`` (T x H x W x 3) and, for an edit with a region of its own (the control),
``mask/<v>`` (T x H x W bool). Meta as for images (``source``, ``targets``, ``instances`` --
one per track --, ``mask``, ``variants``, ``edits``, ``qa``, ``metrics``), plus ``tracking``.

One module per step:

- ``ingest``: PyAV decode, timestamp sampling at ``fps``, capped (see ``video_io``).
- ``localize``: question targets matched to annotated objects; their keyframe polygons/boxes
  become detections on the nearest sampled frame (optionally only every ``keyframe_every``
  frames, as a detector run every N frames would see them).
- ``segment``: tracks carried between detection frames by masked template matching (the
  object's own pixels searched for on the next frame; dense optical flow was measured first and
  dropped: it underestimated the motion of flat-coloured objects and tracks drifted), re-anchored
  at every detection frame by IoU matching; an unmatched detection starts a track (an object
  entering mid-clip) that is also carried backwards to the previous detection frame; gaps
  between two detections take the nearer anchor's propagation. (The instances' recorded
  ``mask_method`` still reads ``"keyframe+flow"``: renaming it would change every video
  dataset's bytes.)
- ``edit``: ``remove`` fills each masked pixel from the frames where that pixel is background
  (per-pixel median, static camera), then inpaints once what no frame shows, so the fill does
  not flicker; ``blackout`` flat fill; ``random_mask`` the neutral control; ``reverse``,
  ``shuffle`` (seeded derangement of segments) and ``freeze`` (a held frame over the middle
  segment) need no model.
- ``qa``: existence/count/direction/order/temporal questions, answered per variant by
  ``rules.answer_for`` from the structured edit context; a variant on which no answer changes
  is dropped (it would teach nothing).
- ``verify``: pixels outside the masks unchanged, the object gone (contrast), temporal flicker
  inside the mask; temporal edits really reorder frames and only reuse original frames.

Helpers shared with the image stages (source reading, keys, dilation, the control region) live
in ``counterfactory.stages.shared``.
"""

from counterfactory.stages.video import edit, ingest, localize, qa, segment, verify  # noqa: F401 - registration
