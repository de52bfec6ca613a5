import PropertyBased
import Testing

@testable import GMemModel

@Suite("RangeMap")
struct RangeMapTests {
    @Test func emptyMapHoldsInitialValueEverywhere() {
        let m = RangeMap(UInt8(7))
        #expect(m.value(at: 0) == 7)
        #expect(m.value(at: UInt64.max) == 7)
        #expect(m.runCount == 1)
        m.checkInvariants()
    }

    @Test func setSplitsAndCoalesces() {
        var m = RangeMap(0)
        m.set(10..<20, to: 1)
        #expect(m.runCount == 3)
        #expect(m.value(at: 9) == 0 && m.value(at: 10) == 1 && m.value(at: 19) == 1 && m.value(at: 20) == 0)
        m.set(20..<30, to: 1)
        #expect(m.runCount == 3, "adjacent equal runs coalesce")
        m.set(10..<30, to: 0)
        #expect(m.runCount == 1, "restoring the neighbours' value removes every breakpoint")
        m.checkInvariants()
    }

    @Test func rangesTouchingTheTopOfTheSpace() {
        var m = RangeMap(false)
        m.set((UInt64.max - 10)..<UInt64.max, to: true)
        #expect(m.value(at: UInt64.max - 1))
        #expect(!m.value(at: UInt64.max - 11))
        m.set(0..<UInt64.max, to: false)
        #expect(m.runCount == 2 || m.runCount == 1)
        m.checkInvariants()
    }

    @Test func runsAreClippedToTheQueriedRange() {
        var m = RangeMap(0)
        m.set(100..<200, to: 5)
        let runs = m.runs(in: 150..<250)
        #expect(runs.map(\.range) == [150..<200, 200..<250])
        #expect(runs.map(\.value) == [5, 0])
        #expect(m.firstIndex(in: 0..<1000, where: { $0 == 5 }) == 100)
        #expect(m.allEqual(in: 120..<180, to: 5))
        #expect(!m.allEqual(in: 120..<201, to: 5))
    }

    @Test func copiesAreIndependent() {
        var a = RangeMap(0)
        for i in stride(from: UInt64(0), to: 20_000, by: 2) { a.set(i..<i + 1, to: 1) }
        let snapshot = a
        a.set(0..<20_000, to: 2)
        #expect(snapshot.value(at: 0) == 1 && snapshot.value(at: 1) == 0)
        #expect(snapshot.runCount == 20_000)
        #expect(a.runCount == 2)
        snapshot.checkInvariants()
        a.checkInvariants()
    }

    @Test func manyRunsStayBalanced() {
        var m = RangeMap(0)
        // Alternating pages, like attributes set on every other 4K page.
        for i in stride(from: UInt64(0), to: 200_000, by: 2) { m.set(i..<i + 1, to: 1) }
        #expect(m.runCount == 200_000)
        m.checkInvariants()
        // Remove them in a scattered order.
        for i in stride(from: UInt64(0), to: 200_000, by: 6) { m.set(i..<i + 1, to: 0) }
        m.checkInvariants()
        #expect(m.value(at: 0) == 0 && m.value(at: 2) == 1)
        m.set(0..<200_000, to: 0)
        #expect(m.runCount == 1)
        m.checkInvariants()
    }

    @Test func matchesAPerIndexReferenceUnderRandomUpdates() async {
        let domain: UInt64 = 64
        let update = PropertyBased.zip(Gen.uint64(in: 0...domain), Gen.uint64(in: 0...domain), Gen.int(in: 0...3))
        await propertyCheck(count: 300, input: update.array(of: 1...60)) { updates in
            var m = RangeMap(0)
            var reference = [Int](repeating: 0, count: Int(domain) + 1)
            for (a, b, v) in updates {
                let lo = min(a, b)
                let hi = max(a, b)
                m.set(lo..<hi, to: v)
                for i in lo..<hi { reference[Int(i)] = v }
            }
            m.checkInvariants()
            for i in 0...domain { #expect(m.value(at: i) == reference[Int(i)]) }
            // Run count equals the number of value changes plus one.
            let changes = zip(reference, reference.dropFirst()).filter { $0 != $1 }.count
            #expect(m.runs(in: 0..<domain + 1).count == changes + 1)
        }
    }

    /// Equal maps hash equally whatever their history (tree shape), and a hash cached
    /// in a snapshot's nodes is not reused after either copy changes.
    @Test func hashFollowsContentNotShape() async {
        let update = PropertyBased.zip(Gen.uint64(in: 0...200), Gen.uint64(in: 0...200), Gen.int(in: 0...2))
        await propertyCheck(count: 200, input: update.array(of: 1...300)) { updates in
            var m = RangeMap(0)
            for (a, b, v) in updates { m.set(min(a, b)..<max(a, b), to: v) }
            _ = m.hashValue  // fill the caches
            // The same content, built run by run from scratch.
            var fresh = RangeMap(0)
            for (r, v) in m.runs(in: 0..<UInt64.max) where v != 0 { fresh.set(r, to: v) }
            #expect(m == fresh && m.hashValue == fresh.hashValue)
            var copy = m
            copy.set(7..<9, to: 3)
            var expected = fresh
            expected.set(7..<9, to: 3)
            // Re-value a whole run: the run count stays, the content does not.
            if let (r, v) = copy.runs(in: 100..<101).first {
                copy.set(r, to: v + 10)
                expected.set(r, to: v + 10)
                #expect(copy.hashValue != m.hashValue || copy == m)
            }
            #expect(copy == expected && copy.hashValue == expected.hashValue)
            #expect(m == fresh && m.hashValue == fresh.hashValue, "the snapshot's cached hash still holds")
        }
    }

    /// A mutation deep in a large map changes its hash, and undoing it restores it.
    @Test func hashSeesOneChangeInManyRuns() {
        var m = RangeMap(0)
        for i in stride(from: UInt64(0), to: 100_000, by: 2) { m.set(i..<i + 1, to: 1) }
        let before = m.hashValue
        // Same number of runs, one value changed: only the digest can tell.
        m.set(50_000..<50_001, to: 2)
        #expect(m.hashValue != before)
        m.set(50_000..<50_001, to: 1)
        #expect(m.hashValue == before)
        m.set(50_001..<50_002, to: 1)
        #expect(m.hashValue != before)
    }
}
