import pytest

from qcompiler.errors import PipelineError
from qcompiler.pm.pipeline import format_pipeline, parse_pipeline


def test_parse_and_format_roundtrip():
    passes = parse_pipeline("smoothquant{alpha=0.5}, rtn{bits=4,group_size=64,clip=mse},lower")
    assert [p.name for p in passes] == ["smoothquant", "rtn", "lower"]
    assert passes[1].bits == 4 and passes[1].group_size == 64 and passes[1].clip == "mse"
    assert format_pipeline(passes) == "smoothquant{alpha=0.5},rtn{bits=4,group_size=64,clip=mse},lower"


@pytest.mark.parametrize(
    "text,message",
    [
        ("rtn{bits=four}", "not a valid"),
        ("rtn{clip=kl}", "not a valid"),
        ("rtn{bits}", "key=value"),
        ("nosuchpass", "unknown pass"),
        ("rtn{{", "cannot parse"),
    ],
)
def test_bad_pipelines(text, message):
    with pytest.raises(PipelineError, match=message):
        parse_pipeline(text)
