"""Bad input to the tokenizer and its image processor raises errors that name the problem."""

import numpy as np
import pytest
import torch

from tokenizer import VQImageProcessor, VQTokenizer


@pytest.fixture(scope="module")
def tok():
    return VQTokenizer.from_preset("tiny").eval()


@pytest.mark.parametrize(
    "pixels,error,message",
    [
        (torch.zeros(1, 1, 32, 32), ValueError, "has 1 channels, but this tokenizer expects in_channels=3"),
        (torch.zeros(1, 3, 30, 32), ValueError, "30x32 is not divisible by the downsampling factor 4"),
        (torch.zeros(3, 32, 32), ValueError, r"rank 4 \(B, C, H, W\), got shape \(3, 32, 32\)"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), TypeError, "float tensor in \\[-1, 1\\], got dtype torch.uint8"),
        (torch.zeros(0, 3, 32, 32), ValueError, "empty batch"),
        (torch.full((1, 3, 32, 32), float("nan")), ValueError, "NaN or Inf"),
        (torch.full((1, 3, 32, 32), 255.0), ValueError, r"must lie in \[-1, 1\], but \|max\| is 255"),
        (np.zeros((1, 3, 32, 32), dtype=np.float32), TypeError, "must be a torch.Tensor"),
    ],
)
def test_encode_rejects(tok, pixels, error, message):
    with pytest.raises(error, match=message):
        tok.encode(pixels)
    with pytest.raises(error, match=message):
        tok(pixels)


@pytest.mark.parametrize(
    "indices,error,message",
    [
        (torch.full((1, 8, 8), 64), ValueError, r"indices must lie in \[0, 64\), got values in \[64, 64\]"),
        (torch.full((1, 8, 8), -1), ValueError, r"\[0, 64\), got values in \[-1, -1\]"),
        (torch.zeros(8, 8, dtype=torch.long), ValueError, r"shape \(B, h, w\), got shape \(8, 8\)"),
        (torch.zeros(1, 8, 8), TypeError, "integer tensor"),
        (torch.zeros(0, 8, 8, dtype=torch.long), ValueError, "empty"),
    ],
)
def test_decode_rejects(tok, indices, error, message):
    with pytest.raises(error, match=message):
        tok.decode(indices)


def test_processor_round_trip_uint8(real_images):
    processor = VQImageProcessor(channels=3)
    pixels = processor.preprocess(real_images)
    assert pixels.shape == (8, 3, 32, 32) and pixels.min() >= -1 and pixels.max() <= 1
    back = processor.postprocess(pixels, output_type="np")
    assert np.array_equal(back, np.stack(real_images))
    assert torch.equal(processor.postprocess(pixels, "pt"), torch.from_numpy(np.stack(real_images)).permute(0, 3, 1, 2))
    pils = processor.postprocess(pixels, "pil")
    assert pils[0].size == (32, 32) and pils[0].mode == "RGB"


def test_processor_inputs_and_resizing(real_images):
    from PIL import Image

    processor = VQImageProcessor(channels=1, resolution=16)
    pil = Image.fromarray(real_images[0])
    tensor = torch.from_numpy(real_images[1]).permute(2, 0, 1)
    floats = real_images[2].astype(np.float32) / 255.0
    out = processor.preprocess([pil, tensor, floats])
    assert out.shape == (3, 1, 16, 16)
    cropper = VQImageProcessor(crop_to_multiple=8)
    assert cropper.preprocess(np.zeros((37, 45, 3), np.uint8)).shape == (1, 3, 32, 40)


def test_processor_errors_and_persistence(tmp_path):
    processor = VQImageProcessor()
    with pytest.raises(ValueError, match="different sizes"):
        processor.preprocess([np.zeros((8, 8, 3), np.uint8), np.zeros((9, 8, 3), np.uint8)])
    with pytest.raises(ValueError, match="must lie in \\[0, 1\\]"):
        processor.preprocess(np.full((8, 8, 3), 2.0))
    with pytest.raises(ValueError, match="NaN or Inf"):
        processor.preprocess(np.full((8, 8, 3), np.nan))
    with pytest.raises(TypeError, match="unsupported type str"):
        processor.preprocess("image.png")
    with pytest.raises(ValueError, match="images is empty"):
        processor.preprocess([])
    with pytest.raises(TypeError, match="uint8"):
        processor.preprocess(torch.zeros(3, 8, 8, dtype=torch.int16))  # float tensors in [0, 1] are taken
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        VQImageProcessor(channels=2)
    with pytest.raises(ValueError, match="output_type"):
        processor.postprocess(torch.zeros(1, 3, 8, 8), "jpeg")
    # a processor whose images the tokenizer could not encode is refused with the tokenizer
    for fields in ({"resolution": 30}, {"crop_to_multiple": 2}):
        with pytest.raises(ValueError, match="is not a multiple of the downsampling factor 4"):
            VQTokenizer(VQTokenizer.from_preset("tiny").config, VQImageProcessor(**fields))
    processor = VQImageProcessor(channels=1, resolution=64)
    processor.save_pretrained(tmp_path)
    assert VQImageProcessor.from_json_file(tmp_path / "preprocessor_config.json") == processor


def test_processor_scales_16_bit_grayscale_instead_of_clipping():
    from PIL import Image

    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    image = Image.fromarray(ramp)
    assert image.mode.startswith("I;16") or image.mode == "I"
    pixels = VQImageProcessor(channels=1).preprocess(image)  # (1, 1, 64, 64)
    expected = torch.from_numpy(np.round(ramp / 257.0) / 127.5 - 1.0).float()
    torch.testing.assert_close(pixels[0, 0], expected, atol=1e-6, rtol=0)
    assert abs(float(pixels.mean())) < 0.01  # a ramp over the whole range averages mid-grey, not white


def test_processor_refuses_negative_32_bit_pixels_and_non_finite_outputs():
    from PIL import Image

    image = Image.fromarray(np.array([[-1, 200], [3, 4]], dtype=np.int32))  # mode "I"
    with pytest.raises(ValueError, match=r"values outside \[0, 65535\]"):
        VQImageProcessor(channels=1).preprocess(image)
    small = Image.fromarray(np.array([[0, 255], [3, 4]], dtype=np.int32))  # mode "I" within 8 bits: kept as is
    pixels = VQImageProcessor(channels=1).preprocess(small)
    torch.testing.assert_close(pixels[0, 0], torch.tensor([[0.0, 255.0], [3.0, 4.0]]) / 127.5 - 1)
    with pytest.raises(ValueError, match="NaN or infinite"):
        VQImageProcessor(channels=1).postprocess(torch.full((1, 1, 2, 2), float("nan")))
