"""HTTP/2 frames read back from raw bytes (hyperframe), for tests that check what a connection sent."""

from __future__ import annotations

from hyperframe.frame import Frame


def frames_in(data: bytes) -> list[Frame]:
    """The complete frames at the start of `data`, in order (a trailing partial frame is left out)."""
    frames: list[Frame] = []
    view = memoryview(data)
    while len(view) >= 9:
        frame, length = Frame.parse_frame_header(view[:9])
        frame.parse_body(view[9 : 9 + length])
        frames.append(frame)
        view = view[9 + length :]
    return frames
