import PropertyBased
import Testing

@testable import GMemModel

/// PageMap against a Dictionary: the same answers, in key order, with snapshots that
/// stay independent and hashes that follow content.
@Suite("PageMap")
struct PageMapTests {
    @Test func matchesADictionaryUnderRandomUpdates() async {
        let op = PropertyBased.zip(Gen.uint64(in: 0...400), Gen.int(in: -1...3))
        await propertyCheck(count: 200, input: op.array(of: 1...400)) { ops in
            var m = PageMap<Int>()
            var reference: [UInt64: Int] = [:]
            var snapshot = m
            var snapshotReference = reference
            for (i, (key, v)) in ops.enumerated() {
                if v < 0 {
                    #expect(m.removeValue(forKey: key) == reference.removeValue(forKey: key))
                } else {
                    m[key] = v
                    reference[key] = v
                }
                if i == ops.count / 2 { (snapshot, snapshotReference) = (m, reference) }
            }
            #expect(m.count == reference.count)
            #expect(m.map(\.key) == reference.keys.sorted(), "iteration is in key order")
            for (k, v) in reference { #expect(m[k] == v) }
            #expect(m.keys(in: 100..<200) == reference.keys.filter { (100..<200).contains($0) }.sorted())
            #expect(snapshot.count == snapshotReference.count && snapshot.allSatisfy { snapshotReference[$0.key] == $0.value },
                    "a snapshot does not see later changes")
            // Equal content, different history: equal, and equal hashes.
            var rebuilt = PageMap<Int>()
            for (k, v) in reference.sorted(by: { $0.key > $1.key }) { rebuilt[k] = v }
            _ = m.hashValue
            #expect(rebuilt == m && rebuilt.hashValue == m.hashValue)
            // What changed since the snapshot, as a diff of the two trees finds it.
            let changed = Set(reference.keys).union(snapshotReference.keys).filter { reference[$0] != snapshotReference[$0] }
            #expect(m.changedKeys(from: snapshot) == changed.sorted())
            #expect((m == snapshot) == changed.isEmpty)
            var other = m
            other[999] = 7
            #expect(other != m && other.changedKeys(from: m) == [999])
        }
    }
}
