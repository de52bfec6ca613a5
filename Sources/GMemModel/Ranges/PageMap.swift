/// A sparse map from page numbers (pfn, gfn, vpn, pgoff) to what the kernel keeps
/// for each: the model's page tables (PTEs, SPTEs), page cache and frame table.
///
/// A copy-on-write B+tree rather than a Dictionary, for the explorer: it snapshots
/// the whole kernel before every step and hashes every state it reaches. A copied
/// Dictionary copies all its entries on its first change and hashes them all; a
/// PageMap copies the path to the change (O(log n)) and rehashes only the nodes that
/// changed (each node caches the digest of its entries), so a guest with millions of
/// faulted pages costs a step what a small one does. Iteration is in key order.
///
/// - Complexity: lookup, insert, remove O(log n); hashing O(nodes changed since the
///   last hash); equality O(1) for a copy not changed since, else O(n).
struct PageMap<Value>: Sequence {
    private var tree = BTreeMap<Value>()

    init() {}

    var count: Int { tree.count }
    var isEmpty: Bool { tree.count == 0 }

    /// The value at `key`; assigning nil removes it.
    subscript(key: UInt64) -> Value? {
        get {
            guard let e = tree.floor(key), e.key == key else { return nil }
            return e.value
        }
        set {
            if let newValue { tree.insert(key, newValue) } else { tree.remove(key) }
        }
    }

    @discardableResult
    mutating func removeValue(forKey key: UInt64) -> Value? { tree.remove(key) }

    /// Whether `other` is this map, unchanged since one was copied from the other.
    ///
    /// - Complexity: O(1).
    func isIdentical(to other: PageMap) -> Bool { tree.shares(with: other.tree) }

    /// The keys present in `range`, in order.
    ///
    /// - Complexity: O(log n + k) for k keys found.
    func keys(in range: Range<UInt64>) -> [UInt64] {
        var out: [UInt64] = []
        guard !range.isEmpty else { return out }
        tree.visit(from: range.lowerBound) { k, _ in
            guard k < range.upperBound else { return false }
            out.append(k)
            return true
        }
        return out
    }

    var keys: [UInt64] { map(\.key) }
    var values: [Value] { map(\.value) }

    func makeIterator() -> IndexingIterator<[(key: UInt64, value: Value)]> {
        var out: [(key: UInt64, value: Value)] = []
        out.reserveCapacity(count)
        tree.visit(from: 0) { k, v in
            out.append((k, v))
            return true
        }
        return out.makeIterator()
    }
}

extension PageMap where Value: Equatable {
    /// The keys whose values differ from `other`'s (added, removed or changed), in
    /// order; what a snapshot and its copy still share is not looked at.
    ///
    /// - Complexity: about O(changed keys x log n) (see `BTreeMap.changedKeys`).
    func changedKeys(from other: PageMap) -> [UInt64] { tree.changedKeys(from: other.tree) }
}

extension PageMap: ExpressibleByDictionaryLiteral {
    init(dictionaryLiteral elements: (UInt64, Value)...) {
        for (k, v) in elements { self[k] = v }
    }
}

extension PageMap: Equatable where Value: Equatable {
    /// - Complexity: O(1) for a copy not changed since; else about the size of the
    ///   parts the two do not share.
    static func == (a: PageMap, b: PageMap) -> Bool { a.tree.sameEntries(as: b.tree) }
}

extension PageMap: Hashable where Value: Hashable {
    func hash(into hasher: inout Hasher) {
        hasher.combine(count)
        hasher.combine(tree.contentDigest)
    }
}
