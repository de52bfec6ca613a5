/// A total map from `UInt64` indices (page frame numbers, page offsets, virtual page
/// numbers) to values, stored as runs: equal neighbours coalesce into one run.
///
/// This is the structure behind memory attributes, guest_memfd page state, bindings
/// and VMAs. Memory is proportional to the number of runs, not to the size of the
/// space: a 1 TiB guest with one attribute is one run.
///
/// Representation: a breakpoint at `k` with value `v` means every index from `k` up to
/// the next breakpoint maps to `v`. A breakpoint at 0 always exists, and no two
/// consecutive breakpoints hold equal values (the coalescing invariant).
///
/// - Complexity: `value(at:)` is O(log r) for r runs; `set(_:to:)` is O(log r) plus
///   O(log r) per run it overwrites.
public struct RangeMap<Value: Equatable> {
    private var tree = BTreeMap<Value>()

    /// A map in which every index holds `initial`.
    public init(_ initial: Value) {
        tree.insert(0, initial)
    }

    /// The number of runs.
    public var runCount: Int { tree.count }

    /// The value at `index`.
    public func value(at index: UInt64) -> Value {
        // A breakpoint at 0 always exists, so there is always a floor.
        tree.floor(index)!.value
    }

    /// Gives every index in `range` the value `value`, coalescing with neighbours.
    public mutating func set(_ range: Range<UInt64>, to value: Value) {
        let a = range.lowerBound
        let b = range.upperBound
        guard a < b else { return }
        let after = self.value(at: b)
        let before: Value? = a > 0 ? self.value(at: a - 1) : nil
        // Remove every breakpoint in [a, b]; b is put back below if it is still needed.
        while let next = tree.ceiling(a), next.key <= b {
            tree.remove(next.key)
            if next.key == UInt64.max { break }
        }
        if before != value { tree.insert(a, value) }
        if after != value { tree.insert(b, after) }
    }

    /// Calls `body` with each run that meets `range`, clipped to `range`, in order,
    /// until it returns false.
    ///
    /// - Complexity: O(log r + k) for k runs visited.
    public func forEachRun(in range: Range<UInt64>, _ body: (Range<UInt64>, Value) -> Bool) {
        guard !range.isEmpty else { return }
        let first = tree.floor(range.lowerBound)!
        var start = range.lowerBound
        var current = first.value
        var stopped = false
        if range.lowerBound < UInt64.max {
            tree.visit(from: range.lowerBound + 1) { key, value in
                if key >= range.upperBound { return false }
                if !body(start..<key, current) {
                    stopped = true
                    return false
                }
                start = key
                current = value
                return true
            }
        }
        if !stopped { _ = body(start..<range.upperBound, current) }
    }

    /// The runs that meet `range`, clipped to it.
    public func runs(in range: Range<UInt64>) -> [(range: Range<UInt64>, value: Value)] {
        var out: [(range: Range<UInt64>, value: Value)] = []
        forEachRun(in: range) { r, v in
            out.append((r, v))
            return true
        }
        return out
    }

    /// The first index in `range` whose value satisfies `predicate`, if any.
    public func firstIndex(in range: Range<UInt64>, where predicate: (Value) -> Bool) -> UInt64? {
        var found: UInt64?
        forEachRun(in: range) { r, v in
            if predicate(v) {
                found = r.lowerBound
                return false
            }
            return true
        }
        return found
    }

    /// Whether every index in `range` holds `value`.
    public func allEqual(in range: Range<UInt64>, to value: Value) -> Bool {
        firstIndex(in: range, where: { $0 != value }) == nil
    }

    /// Checks the B+tree and the coalescing invariant; traps on a violation. For tests.
    public func checkInvariants() {
        tree.checkInvariants()
        precondition(tree.floor(0)?.key == 0, "no breakpoint at 0")
        var previous: Value?
        tree.visit(from: 0) { _, v in
            if let p = previous { precondition(p != v, "equal neighbouring runs are not coalesced") }
            previous = v
            return true
        }
    }
}

extension RangeMap {
    /// Whether `other` is this map, unchanged since one was copied from the other.
    ///
    /// - Complexity: O(1).
    func isIdentical(to other: RangeMap) -> Bool { tree.shares(with: other.tree) }
}

extension RangeMap: Equatable {
    /// The breakpoints are canonical (runs coalesce), so equal maps have equal
    /// breakpoints.
    ///
    /// - Complexity: O(1) when the two share their tree (a snapshot and its
    ///   unmodified copy); else about the size of the parts they do not share.
    public static func == (lhs: RangeMap, rhs: RangeMap) -> Bool { lhs.tree.sameEntries(as: rhs.tree) }
}

extension RangeMap: Hashable where Value: Hashable {
    /// The runs' digest (independent of the tree's shape, as equality is).
    ///
    /// - Complexity: O(log runs x 64) after a mutation of one run, O(1) when nothing
    ///   changed since the last hash: the explorer hashes every state it reaches, and
    ///   a terabyte guest's millions of ranges must not be walked each time.
    public func hash(into hasher: inout Hasher) {
        hasher.combine(runCount)
        hasher.combine(tree.contentDigest)
    }
}

// Not Sendable: its B+tree nodes cache a digest of their entries when first hashed
// (BTreeMap.contentDigest), so a map must stay on one thread at a time, which Swift 6
// region checking enforces for non-Sendable values.
