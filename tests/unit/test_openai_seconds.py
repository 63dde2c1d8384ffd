"""OpenAI `seconds` to frame steps: exact, half a step rounding up."""

from __future__ import annotations

import pytest

from gateway.openai_api import frame_steps


@pytest.mark.parametrize(
    ("seconds", "fps", "frame_step", "steps"),
    [
        ("0.6", 8, 8, 0),  # under half a step: none
        ("0.625", 8, 8, 1),  # exactly half a step rounds up
        ("2.625", 8, 8, 3),  # round() would go to the even step, 2
        ("3.625", 8, 8, 4),
        ("5", 24, 8, 15),  # 121 frames
        ("4", 16, 4, 16),  # 65 frames
        # Exactly half a step where floats fall just short of it (8.2 x 15 = 122.99999999999999):
        # floats make a step less.
        ("8.2", 15, 4, 31),
        ("4.6", 25, 4, 29),
        ("10.2", 25, 4, 64),
    ],
)
def test_seconds_make_frame_steps(seconds: str, fps: int, frame_step: int, steps: int) -> None:
    assert frame_steps(seconds, fps, frame_step) == steps


@pytest.mark.parametrize("prompt", ["\u0085a red fox", "a red fox\u000b", "\u000c"])
def test_control_characters_at_either_end_of_a_prompt_are_refused_not_stripped(prompt) -> None:
    from pydantic import ValidationError

    from gateway.openai_api import CreateVideo
    from schemas.requests import TextToVideoRequest

    for model, payload in (
        (CreateVideo, {"prompt": prompt}),
        (TextToVideoRequest, {"prompt": "x", "negative_prompt": prompt}),
    ):
        with pytest.raises(ValidationError) as raised:
            model.model_validate(payload)
        assert [e["type"] for e in raised.value.errors()] == ["control_characters"], raised.value
