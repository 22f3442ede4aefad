from dataclasses import asdict

from unlearn.benchmarks.synthetic import SPLITS, SyntheticSettings, generate


def test_generator_is_deterministic():
    a, b = generate(SyntheticSettings(seed=3)), generate(SyntheticSettings(seed=3))
    assert a.fingerprint() == b.fingerprint()
    assert [asdict(f) for f in a.facts["forget"]] == [asdict(f) for f in b.facts["forget"]]
    assert generate(SyntheticSettings(seed=4)).fingerprint() != a.fingerprint()


def test_split_sizes_follow_settings():
    s = SyntheticSettings(seed=0, people=(2, 3, 4), cities=(1, 1, 2), organizations=(1, 2, 1))
    bench = generate(s)
    # people have 5 attributes, cities and organizations 2 each
    assert len(bench.facts["forget"]) == 2 * 5 + 1 * 2 + 1 * 2
    assert len(bench.facts["retain"]) == 3 * 5 + 1 * 2 + 2 * 2
    assert len(bench.facts["holdout"]) == 4 * 5 + 2 * 2 + 1 * 2
    assert [len(bench.passages[x]) for x in SPLITS] == [4, 6, 7]


def test_facts_are_well_formed_and_splits_disjoint():
    bench = generate()
    entities = {split: {f.entity for f in bench.facts[split]} for split in SPLITS}
    assert not entities["forget"] & entities["retain"]
    assert not entities["forget"] & entities["holdout"]
    assert not entities["retain"] & entities["holdout"]
    for split in SPLITS:
        for fact in bench.facts[split]:
            assert len(fact.choices) == 4 == len(set(fact.choices))
            assert fact.choices[fact.answer_index] == fact.answer
            assert fact.entity in fact.question and fact.entity in fact.paraphrase
            assert fact.question != fact.paraphrase
            assert fact.split == split


def test_answers_are_spread_over_options():
    facts = [f for split in SPLITS for f in generate().facts[split]]
    counts = [sum(f.answer_index == i for f in facts) for i in range(4)]
    assert min(counts) > len(facts) / 8  # no position bias a model could exploit
