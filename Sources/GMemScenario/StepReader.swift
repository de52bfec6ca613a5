import GMemBackend
import GMemModel

/// Typed access to one step's fields; every error names the file, step and field.
struct StepReader {
    let obj: JSONObject
    let file: String
    let index: Int
    let names: [String: HandleKind]
    var op = ""
    var used: Set<String> = ScenarioParser.commonFields

    init(obj: JSONObject, file: String, index: Int, names: [String: HandleKind]) {
        self.obj = obj
        self.file = file
        self.index = index
        self.names = names
    }

    func fail(_ field: String?, _ message: String) -> ScenarioError {
        ScenarioError(file: file, step: index, op: op.isEmpty ? nil : op, field: field, message: message)
    }

    mutating func raw(_ key: String) -> JSON? {
        used.insert(key)
        return obj[key]
    }

    mutating func number(_ key: String) throws(ScenarioError) -> UInt64 {
        guard let v = try optionalNumber(key) else { throw fail(key, "missing (expected a number)") }
        return v
    }

    mutating func optionalNumber(_ key: String) throws(ScenarioError) -> UInt64? {
        guard let j = raw(key) else { return nil }
        guard let v = NumberSyntax.parse(j) else {
            throw fail(key, "expected a number (an integer, or a string like \"0xC0000000\", \"4K\", \"2M\", \"2^63-4K\"), got \(j.rendered)")
        }
        return v
    }

    mutating func number32(_ key: String, default d: UInt32? = nil) throws(ScenarioError) -> UInt32 {
        guard let v = try optionalNumber(key) else {
            if let d { return d }
            throw fail(key, "missing (expected a number)")
        }
        guard v <= UInt64(UInt32.max) else { throw fail(key, "\(v) does not fit in 32 bits") }
        return UInt32(v)
    }

    mutating func string(_ key: String) throws(ScenarioError) -> String? {
        guard let j = raw(key) else { return nil }
        guard case .string(let s) = j else { throw fail(key, "expected a string, got \(j.rendered)") }
        return s
    }

    mutating func bool(_ key: String) throws(ScenarioError) -> Bool? {
        guard let j = raw(key) else { return nil }
        guard case .bool(let b) = j else { throw fail(key, "expected true or false, got \(j.rendered)") }
        return b
    }

    mutating func bytes(_ key: String) throws(ScenarioError) -> [UInt8] {
        guard let j = raw(key) else { throw fail(key, "missing (expected bytes: hex, or {\"fill\", \"len\"})") }
        switch BytesSyntax.parse(j) {
        case .success(let b): return b
        case .failure(let m): throw fail(key, m.message)
        }
    }

    /// A set of flags given as names from `table`, or as a number.
    mutating func flags(_ key: String, _ table: [String: UInt64], default d: UInt64 = 0) throws(ScenarioError) -> UInt64 {
        guard let j = raw(key) else { return d }
        if let n = NumberSyntax.parse(j) { return n }
        let known = table.keys.sorted().joined(separator: ", ")
        if case .string(let s) = j, let bit = table[s] { return bit }
        guard case .array(let items) = j else { throw fail(key, "expected a list of names (\(known)) or a number") }
        var v: UInt64 = 0
        for item in items {
            guard case .string(let s) = item, let bit = table[s] else {
                throw fail(key, "unknown flag \(item.rendered) (expected \(known))")
            }
            v |= bit
        }
        return v
    }

    /// A handle of kind `kind` named by an earlier step, or (for fds) a raw number.
    mutating func ref(_ key: String, kind: HandleKind = .fd) throws(ScenarioError) -> Ref {
        guard let r = try optionalRef(key, kind: kind) else { throw fail(key, "missing (expected a \(kind.rawValue) handle name)") }
        return r
    }

    mutating func optionalRef(_ key: String, kind: HandleKind = .fd) throws(ScenarioError) -> Ref? {
        guard let j = raw(key) else { return nil }
        if case .string(let s) = j {
            if let k = names[s] {
                guard k == kind else { throw fail(key, "'\(s)' names a \(k.rawValue), expected a \(kind.rawValue)") }
                return .name(s)
            }
            if kind == .fd, let n = NumberSyntax.parse(j) { return .raw(Int32(truncatingIfNeeded: n)) }
            throw fail(key, "unknown handle name '\(s)' (no earlier step has \"as\": \"\(s)\")")
        }
        if kind == .fd, let n = NumberSyntax.parse(j) { return .raw(Int32(truncatingIfNeeded: n)) }
        throw fail(key, "expected a \(kind.rawValue) handle name, got \(j.rendered)")
    }

    mutating func guestName() throws(ScenarioError) -> String? {
        guard obj["guest"] != nil else { return nil }
        guard case .name(let n) = try ref("guest", kind: .guest) else { throw fail("guest", "expected a pkvm_guest name") }
        return n
    }

    mutating func domainName() throws(ScenarioError) -> String {
        guard case .name(let n) = try ref("domain", kind: .domain) else { throw fail("domain", "expected an IOMMU domain name") }
        return n
    }

    mutating func mapName(_ key: String) throws(ScenarioError) -> String {
        guard case .name(let n) = try ref(key, kind: .map) else { throw fail(key, "expected a mapping name") }
        return n
    }

    func finish() throws(ScenarioError) {
        for key in obj.keys where !used.contains(key) {
            throw fail(key, "unknown field for op '\(op)'")
        }
    }

    /// Guest accesses name a vCPU (`vcpu`) or a VM (`vm`: its vCPU 0, created on first use).
    mutating func vcpuRef() throws(ScenarioError) -> Ref {
        if let v = try optionalRef("vcpu") {
            if obj["vm"] != nil { throw fail("vm", "give either \"vm\" or \"vcpu\", not both") }
            return v
        }
        guard let vm = try optionalRef("vm") else { throw fail("vm", "missing (expected a VM or, as \"vcpu\", a vCPU)") }
        return vm
    }

    /// A host address: a number, a mapping name, or {"map", "offset"}.
    mutating func addressRef(_ key: String) throws(ScenarioError) -> AddressRef? {
        guard let j = raw(key) else { return nil }
        switch j {
        case .object(let o):
            guard case .string(let m)? = o["map"], names[m] == .map else {
                throw fail(key, "expected {\"map\": <mapping name>, \"offset\": <number>}")
            }
            return .map(m, offset: o["offset"].flatMap { NumberSyntax.parse($0) } ?? 0)
        case .string(let s) where names[s] == .map:
            return .map(s, offset: 0)
        default:
            guard let n = NumberSyntax.parse(j) else {
                throw fail(key, "expected a number, a mapping name, or {\"map\", \"offset\"}")
            }
            return .absolute(n)
        }
    }
}
