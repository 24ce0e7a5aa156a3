"""FaceAnalyzer (face_recognition, HOG on CPU) on photos that installed packages ship."""

from __future__ import annotations

import matplotlib.cbook
import pytest
import skimage.data
from PIL import Image

from flen_resources.faces import DLIB_SAME_PERSON_DISTANCE, FaceAnalyzer, face_distance


@pytest.fixture(scope="module")
def analyzer() -> FaceAnalyzer:
    return FaceAnalyzer("hog")


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(skimage.data.astronaut())


@pytest.fixture(scope="module")
def astronaut_head(astronaut) -> Image.Image:
    return astronaut.crop((0, 0, astronaut.width, 300))  # rows 0:300


@pytest.fixture(scope="module")
def head_face(analyzer, astronaut_head):
    faces = analyzer.analyze(astronaut_head)
    assert len(faces) == 1
    return faces[0]


def test_astronaut_crop_has_exactly_one_face(analyzer, astronaut_head):
    faces = analyzer.analyze(astronaut_head)
    assert len(faces) == 1
    face = faces[0]
    top, right, bottom, left = face.box
    assert 0 <= top < bottom <= astronaut_head.height
    assert 0 <= left < right <= astronaut_head.width
    assert face.size >= 40
    assert face.embedding.shape == (128,)


def test_full_astronaut_has_two_faces(analyzer, astronaut):
    faces = analyzer.analyze(astronaut)
    assert len(faces) == 2
    assert faces[0].area >= faces[1].area  # largest first


def test_camera_has_no_face(analyzer):
    assert analyzer.analyze(Image.fromarray(skimage.data.camera())) == []


def test_boxes_are_in_original_pixels_when_downscaled(astronaut_head, head_face):
    # Analyzed at half size internally, boxes still refer to the image passed in.
    big = astronaut_head.resize((astronaut_head.width * 2, astronaut_head.height * 2), Image.BILINEAR)
    faces = FaceAnalyzer("hog", max_side=astronaut_head.width).analyze(big)
    assert len(faces) == 1
    for got, want in zip(faces[0].box, head_face.box):
        assert abs(got - 2 * want) <= 12


def test_another_person_is_far(analyzer, head_face):
    grace = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")
    faces = analyzer.analyze(grace)
    assert len(faces) == 1
    assert face_distance(head_face.embedding, faces[0].embedding) > DLIB_SAME_PERSON_DISTANCE


def test_mirror_image_is_the_same_person(analyzer, astronaut_head, head_face):
    faces = analyzer.analyze(astronaut_head.transpose(Image.FLIP_LEFT_RIGHT))
    assert len(faces) == 1
    assert face_distance(head_face.embedding, faces[0].embedding) < 0.4
