/// An ordered map from `UInt64` keys to values: a copy-on-write B+tree.
///
/// Nodes are shared between copies and copied along the path of a mutation only, so
/// copying a map (a snapshot of the model's world) is O(1).
///
/// Internal nodes keep, for each child, the smallest key in that child's subtree
/// (`keys[i] == min(children[i])`), so a floor search picks the last child whose
/// smallest key is not above the key sought.
///
/// - Complexity: lookup, insert and remove are O(log n).
struct BTreeMap<Value> {
    static var maxEntries: Int { 64 }
    static var minEntries: Int { 16 }

    final class Node {
        // Unchecked exclusivity: a node is mutated only by the map that holds it
        // uniquely (makeUnique), never through two accesses at once; the runtime
        // checks were a third of the model's host-fault time.
        @exclusivity(unchecked) var keys: [UInt64]
        @exclusivity(unchecked) var values: [Value]  // leaves only
        @exclusivity(unchecked) var children: [Node]  // internal nodes only
        let isLeaf: Bool
        /// Wrapping sum of the entries' hashes below this node, once computed; reset
        /// whenever the node is mutated (every mutation passes `makeUnique`).
        @exclusivity(unchecked) var digest: Int?

        init(leafKeys: [UInt64], values: [Value]) {
            self.keys = leafKeys
            self.values = values
            self.children = []
            self.isLeaf = true
        }

        init(internalKeys: [UInt64], children: [Node]) {
            self.keys = internalKeys
            self.values = []
            self.children = children
            self.isLeaf = false
        }

        func clone() -> Node {
            isLeaf
                ? Node(leafKeys: keys, values: values)
                : Node(internalKeys: keys, children: children)
        }

        var minKey: UInt64 { keys[0] }
    }

    private(set) var root: Node
    private(set) var count: Int

    init() {
        root = Node(leafKeys: [], values: [])
        count = 0
    }

    // MARK: Search helpers

    /// The first index whose key is greater than `key`.
    @inline(__always)
    static func upperBound(_ keys: [UInt64], _ key: UInt64) -> Int {
        var lo = 0
        var hi = keys.count
        while lo < hi {
            let mid = (lo &+ hi) >> 1
            if keys[mid] <= key { lo = mid + 1 } else { hi = mid }
        }
        return lo
    }

    /// The first index whose key is not less than `key`.
    @inline(__always)
    static func lowerBound(_ keys: [UInt64], _ key: UInt64) -> Int {
        var lo = 0
        var hi = keys.count
        while lo < hi {
            let mid = (lo &+ hi) >> 1
            if keys[mid] < key { lo = mid + 1 } else { hi = mid }
        }
        return lo
    }

    // MARK: Queries

    /// The entry with the greatest key not above `key`.
    func floor(_ key: UInt64) -> (key: UInt64, value: Value)? {
        var node = root
        while true {
            let i = Self.upperBound(node.keys, key) - 1
            if i < 0 { return nil }
            if node.isLeaf { return (node.keys[i], node.values[i]) }
            node = node.children[i]
        }
    }

    /// The entry with the smallest key not below `key`.
    func ceiling(_ key: UInt64) -> (key: UInt64, value: Value)? {
        var found: (UInt64, Value)?
        visit(from: key) { k, v in
            found = (k, v)
            return false
        }
        return found
    }

    /// Calls `body` on every entry whose key is not below `key`, in key order,
    /// until it returns false.
    ///
    /// - Complexity: O(log n + k) for k entries visited.
    func visit(from key: UInt64, _ body: (UInt64, Value) -> Bool) {
        _ = Self.visit(root, from: key, body)
    }

    private static func visit(_ node: Node, from key: UInt64, _ body: (UInt64, Value) -> Bool) -> Bool {
        if node.isLeaf {
            var i = lowerBound(node.keys, key)
            while i < node.keys.count {
                if !body(node.keys[i], node.values[i]) { return false }
                i += 1
            }
            return true
        }
        var i = max(upperBound(node.keys, key) - 1, 0)
        while i < node.children.count {
            if !visit(node.children[i], from: key, body) { return false }
            i += 1
        }
        return true
    }

    // MARK: Insert

    /// Inserts or replaces the value at `key`.
    mutating func insert(_ key: UInt64, _ value: Value) {
        let (inserted, split) = Self.insert(into: &root, key, value)
        if inserted { count += 1 }
        if let split {
            root = Node(internalKeys: [root.minKey, split.minKey], children: [root, split])
        }
    }

    /// Gives `node` to the caller to mutate: a copy if a snapshot shares it, and in
    /// any case without its cached digest.
    @inline(__always)
    private static func makeUnique(_ node: inout Node) {
        if !isKnownUniquelyReferenced(&node) { node = node.clone() }
        node.digest = nil
    }

    /// Whether two maps are the same tree (a copy not mutated since).
    func shares(with other: BTreeMap) -> Bool { root === other.root }

    /// Returns whether a new key was added, and the new right sibling if `node` split.
    private static func insert(into node: inout Node, _ key: UInt64, _ value: Value) -> (Bool, Node?) {
        makeUnique(&node)
        let inserted: Bool
        if node.isLeaf {
            let i = lowerBound(node.keys, key)
            if i < node.keys.count && node.keys[i] == key {
                node.values[i] = value
                return (false, nil)
            }
            node.keys.insert(key, at: i)
            node.values.insert(value, at: i)
            inserted = true
        } else {
            var i = upperBound(node.keys, key) - 1
            if i < 0 {
                // A new smallest key goes into the first child.
                i = 0
                node.keys[0] = key
            }
            let (added, split) = insert(into: &node.children[i], key, value)
            inserted = added
            if let split {
                node.keys.insert(split.minKey, at: i + 1)
                node.children.insert(split, at: i + 1)
            }
        }
        guard node.keys.count > maxEntries else { return (inserted, nil) }
        return (inserted, splitHalf(node))
    }

    /// Moves the upper half of `node` into a new node and returns it.
    private static func splitHalf(_ node: Node) -> Node {
        let mid = node.keys.count / 2
        let rightKeys = Array(node.keys[mid...])
        node.keys.removeSubrange(mid...)
        if node.isLeaf {
            let rightValues = Array(node.values[mid...])
            node.values.removeSubrange(mid...)
            return Node(leafKeys: rightKeys, values: rightValues)
        }
        let rightChildren = Array(node.children[mid...])
        node.children.removeSubrange(mid...)
        return Node(internalKeys: rightKeys, children: rightChildren)
    }

    // MARK: Remove

    /// Removes the entry at `key`; returns its value if there was one.
    @discardableResult
    mutating func remove(_ key: UInt64) -> Value? {
        let removed = Self.remove(from: &root, key)
        if removed != nil { count -= 1 }
        if !root.isLeaf && root.children.count == 1 { root = root.children[0] }
        return removed
    }

    private static func remove(from node: inout Node, _ key: UInt64) -> Value? {
        if node.isLeaf {
            let i = lowerBound(node.keys, key)
            guard i < node.keys.count && node.keys[i] == key else { return nil }
            makeUnique(&node)
            node.keys.remove(at: i)
            return node.values.remove(at: i)
        }
        let i = upperBound(node.keys, key) - 1
        guard i >= 0 else { return nil }
        // Look before copying: a miss must not copy the path.
        guard contains(node.children[i], key) else { return nil }
        makeUnique(&node)
        let removed = remove(from: &node.children[i], key)
        if node.children[i].keys.isEmpty {
            node.keys.remove(at: i)
            node.children.remove(at: i)
        } else {
            node.keys[i] = node.children[i].minKey
            if node.children[i].keys.count < minEntries && node.children.count > 1 {
                rebalance(node, at: i)
            }
        }
        return removed
    }

    private static func contains(_ node: Node, _ key: UInt64) -> Bool {
        var n = node
        while !n.isLeaf {
            let i = upperBound(n.keys, key) - 1
            if i < 0 { return false }
            n = n.children[i]
        }
        let i = lowerBound(n.keys, key)
        return i < n.keys.count && n.keys[i] == key
    }

    /// Restores the minimum fill of `parent.children[i]` by merging it with a
    /// neighbour or taking entries from one.
    private static func rebalance(_ parent: Node, at i: Int) {
        let l = i > 0 ? i - 1 : i
        let r = l + 1
        makeUnique(&parent.children[l])
        makeUnique(&parent.children[r])
        let left = parent.children[l]
        let right = parent.children[r]
        if left.keys.count + right.keys.count <= maxEntries {
            left.keys.append(contentsOf: right.keys)
            if left.isLeaf {
                left.values.append(contentsOf: right.values)
            } else {
                left.children.append(contentsOf: right.children)
            }
            parent.keys.remove(at: r)
            parent.children.remove(at: r)
            return
        }
        // Share the entries evenly between the two.
        let total = left.keys.count + right.keys.count
        let target = total / 2
        if left.keys.count < target {
            let move = target - left.keys.count
            left.keys.append(contentsOf: right.keys[..<move])
            right.keys.removeSubrange(..<move)
            if left.isLeaf {
                left.values.append(contentsOf: right.values[..<move])
                right.values.removeSubrange(..<move)
            } else {
                left.children.append(contentsOf: right.children[..<move])
                right.children.removeSubrange(..<move)
            }
        } else {
            let move = left.keys.count - target
            let from = left.keys.count - move
            right.keys.insert(contentsOf: left.keys[from...], at: 0)
            left.keys.removeSubrange(from...)
            if left.isLeaf {
                right.values.insert(contentsOf: left.values[from...], at: 0)
                left.values.removeSubrange(from...)
            } else {
                right.children.insert(contentsOf: left.children[from...], at: 0)
                left.children.removeSubrange(from...)
            }
        }
        parent.keys[r] = right.minKey
    }

    // MARK: Invariants

    /// Checks the B+tree's structural invariants; traps on a violation.
    /// For tests: sorted keys, separator keys equal to subtree minima, uniform
    /// depth, fill bounds below the root, and `count`.
    func checkInvariants() {
        var leafDepth: Int?
        var seen = 0
        var last: UInt64?
        func walk(_ n: Node, depth: Int, isRoot: Bool) {
            precondition(n.keys.count <= Self.maxEntries, "node overfull")
            if !isRoot { precondition(n.keys.count >= 1, "empty non-root node") }
            for j in n.keys.indices.dropFirst() { precondition(n.keys[j - 1] < n.keys[j], "keys out of order") }
            if n.isLeaf {
                precondition(n.values.count == n.keys.count)
                if let d = leafDepth { precondition(d == depth, "leaves at different depths") } else { leafDepth = depth }
                for k in n.keys {
                    if let p = last { precondition(p < k, "keys out of order across leaves") }
                    last = k
                }
                seen += n.keys.count
            } else {
                precondition(n.children.count == n.keys.count)
                for (j, c) in n.children.enumerated() {
                    precondition(c.minKey == n.keys[j], "separator is not the subtree minimum")
                    walk(c, depth: depth + 1, isRoot: false)
                }
            }
        }
        walk(root, depth: 0, isRoot: true)
        precondition(seen == count, "count mismatch")
    }
}

extension BTreeMap where Value: Hashable {
    /// A hash of the entries that does not depend on the tree's shape: the wrapping
    /// sum of each entry's hash, kept in every node until the node is next mutated.
    ///
    /// - Complexity: O(nodes changed since the last call x 64).
    var contentDigest: Int { Self.digest(root) }

    private static func digest(_ node: Node) -> Int {
        if let d = node.digest { return d }
        var sum = 0
        if node.isLeaf {
            for (k, v) in zip(node.keys, node.values) {
                var h = Hasher()
                h.combine(k)
                h.combine(v)
                sum &+= h.finalize()
            }
        } else {
            for c in node.children { sum &+= digest(c) }
        }
        node.digest = sum
        return sum
    }
}

extension BTreeMap where Value: Equatable {
    /// The keys whose entries differ between the two maps (added, removed or
    /// changed), in order, skipping the subtrees a snapshot and its copy still share.
    ///
    /// - Complexity: O(log n x 64) for one changed entry when the two trees have the
    ///   same shape above it; where a split or merge changed the shape, O(size of
    ///   the subtree whose shape changed).
    func changedKeys(from other: BTreeMap) -> [UInt64] {
        var out: [UInt64] = []
        Self.diff(root, other.root, &out, firstOnly: false)
        return out
    }

    /// Whether the two maps hold the same entries: the same walk as `changedKeys`,
    /// stopping at the first difference, so two states reached by different paths
    /// from a common ancestor compare in about the time their differences take.
    func sameEntries(as other: BTreeMap) -> Bool {
        guard count == other.count else { return false }
        if root === other.root { return true }
        // Small maps (one leaf) compare directly.
        if root.isLeaf && other.root.isLeaf { return root.keys == other.root.keys && root.values == other.root.values }
        var out: [UInt64] = []
        Self.diff(root, other.root, &out, firstOnly: true)
        return out.isEmpty
    }

    private static func diff(_ a: Node, _ b: Node, _ out: inout [UInt64], firstOnly: Bool) {
        if a === b || (firstOnly && !out.isEmpty) { return }
        if !a.isLeaf && !b.isLeaf && a.keys == b.keys {
            // Same separators: child i covers the same keys in both.
            for (x, y) in zip(a.children, b.children) {
                diff(x, y, &out, firstOnly: firstOnly)
                if firstOnly && !out.isEmpty { return }
            }
            return
        }
        var ea: [(UInt64, Value)] = []
        var eb: [(UInt64, Value)] = []
        entries(a, &ea)
        entries(b, &eb)
        var i = 0, j = 0
        while i < ea.count || j < eb.count {
            if j == eb.count || (i < ea.count && ea[i].0 < eb[j].0) {
                out.append(ea[i].0)
                i += 1
            } else if i == ea.count || eb[j].0 < ea[i].0 {
                out.append(eb[j].0)
                j += 1
            } else {
                if ea[i].1 != eb[j].1 { out.append(ea[i].0) }
                i += 1
                j += 1
            }
        }
    }

    private static func entries(_ node: Node, _ out: inout [(UInt64, Value)]) {
        if node.isLeaf {
            for (k, v) in zip(node.keys, node.values) { out.append((k, v)) }
        } else {
            for c in node.children { entries(c, &out) }
        }
    }
}
