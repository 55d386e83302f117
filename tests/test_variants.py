"""Named Swin V2 variants match the official zoo, and impossible configurations name the value to change."""

import pytest

from shared_data import variants


@pytest.mark.parametrize("size", ["tiny", "small", "base", "large"])
@pytest.mark.parametrize("window", ["window8_256", "window16_256", "window12_192", "window12to16_192to256",
                                    "window12to24_192to384"])
def test_every_official_size_and_window_is_a_working_variant(size, window):
    config = variants.variant_config(f"swinv2_{size}_{window}")
    assert config["img_size"] in (192, 256, 384)


def test_fine_tuned_variants_keep_their_pretraining_windows():
    config = variants.variant_config("swinv2_base_window12to24_192to384")
    assert (config["window_size"], config["pretrained_window_sizes"]) == (24, (12, 12, 12, 6))


def test_windows_larger_than_a_stage_are_clipped_and_not_shifted():
    resolutions = variants.stage_resolutions(64, 4, 4)
    assert resolutions == [16, 8, 4, 2]
    assert [variants.effective_window(r, 4) for r in resolutions] == [(4, True), (4, True), (4, False), (2, False)]


@pytest.mark.parametrize(
    "overrides, named",
    [
        (dict(img_size=250), "img_size"),
        (dict(num_heads=(5, 6, 12, 24)), "num_heads"),
        (dict(window_size=7), "window_size"),
        (dict(depths=(2, 2, 6)), "num_heads"),
        (dict(pretrained_window_sizes=(0, 0)), "pretrained_window_sizes"),
    ],
)
def test_impossible_configuration_names_the_value_to_change(overrides, named):
    with pytest.raises(ValueError, match=named):
        variants.variant_config("swinv2_tiny_window8_256", **overrides)


def test_unknown_variant_lists_the_known_ones():
    with pytest.raises(ValueError, match="swinv2_tiny_window8_256"):
        variants.variant_config("swinv2_tiny_window9_256")
