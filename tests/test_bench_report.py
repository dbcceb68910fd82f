"""bench/report.py: ratios to (a) pair each round's runs."""

from bench.report import Sample, Variant, paired_ratios, ratio_to_base


def variant(key: str, seconds: list[float], disturbed: tuple[int, ...] = ()) -> Variant:
    return Variant(key, key, samples=[Sample(s, disturbed=i in disturbed) for i, s in enumerate(seconds)])


def test_each_round_is_divided_by_its_own_baseline():
    base = variant("a", [4.0, 6.0, 5.0])  # the machine slowed down in round 2
    ours = variant("c", [4.4, 6.6, 5.5])
    assert [round(r, 3) for r in paired_ratios(ours, base)] == [1.1, 1.1, 1.1]
    assert round(ratio_to_base(ours, base), 3) == 1.1
    assert round(ours.seconds / base.seconds, 3) == 1.1  # here both agree; below they do not


def test_drift_that_separate_medians_would_read_as_overhead():
    base = variant("a", [4.0, 4.1, 6.0])
    ours = variant("c", [6.2, 4.5, 6.5])
    assert round(ours.seconds / base.seconds, 2) == 1.51
    assert round(ratio_to_base(ours, base), 3) == round(4.5 / 4.1, 3)  # median of 1.55, 1.098, 1.083


def test_disturbed_rounds_are_left_out_and_unpaired_variants_fall_back():
    base = variant("a", [4.0, 5.0, 6.0], disturbed=(1,))
    ours = variant("c", [4.4, 9.0, 6.0])
    assert [round(r, 2) for r in paired_ratios(ours, base)] == [1.1, 1.0]
    half = variant("c-half", [2.0, 2.2])
    assert paired_ratios(half, base) == []
    assert ratio_to_base(half, base) == half.seconds / base.seconds


def test_another_benchmarks_section_is_replaced_in_place_and_kept_when_the_page_is_rewritten():
    from bench.report import kept_sections, splice_section

    page = "# Benchmarks\n\nintro\n"
    once = splice_section(page, "restore", ["## Restore", "| a | 1.40 |"])
    assert once == "# Benchmarks\n\nintro\n\n<!-- restore -->\n## Restore\n| a | 1.40 |\n<!-- /restore -->\n"
    twice = splice_section(once + "tail\n", "restore", ["## Restore", "| a | 1.30 |"])
    assert twice.count("<!-- restore -->") == 1 and "1.40" not in twice and "| a | 1.30 |" in twice
    assert twice.endswith("<!-- /restore -->\ntail\n")
    rewritten = kept_sections(twice, "# Benchmarks\n\nnew backup numbers\n", ["restore"])
    assert "new backup numbers" in rewritten and "| a | 1.30 |" in rewritten and "intro" not in rewritten
