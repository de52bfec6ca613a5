import GMemBackend

/// How a step's outcome becomes an observation (bytes, signals, exits, guest-program
/// events, as `expect_*` fields and `--json` spell them), and how an observation is
/// checked against the step's expectations.
extension ScenarioRunner {
    static func bytesRead(_ bytes: [UInt8]) -> Observation {
        Observation(result: .ok, value: .object(JSONObject(["len": .int(bytes.count), "bytes": .string(BytesSyntax.describe(bytes))])),
                    bytes: bytes)
    }

    static func host(_ access: HostAccess, base: UInt64) -> Observation {
        switch access {
        case .completed(let bytes): bytesRead(bytes)
        case .sigbus(let a): Observation(result: .sigbus, value: .object(JSONObject(["offset": .int(a &- base)])))
        case .sigsegv(let a): Observation(result: .sigsegv, value: .object(JSONObject(["offset": .int(a &- base)])))
        }
    }

    /// A guest program's event as `expect_value` spells it.
    public static func render(_ event: GuestEvent) -> JSON {
        switch event {
        case .reported(let v):
            return .object(JSONObject(["report": .int(v)]))
        case .verified(let gpa, let length, let at):
            return .object(JSONObject(["verify": .object(JSONObject([
                "gpa": .int(gpa), "len": .int(length), "mismatch": at.map { .int($0) } ?? .null,
            ]))]))
        case .conversion(let r, let result):
            return .object(JSONObject(["convert": .object(JSONObject([
                "gpa": .int(r.gpa), "npages": .int(r.npages), "to": .string(r.toPrivate ? "private" : "shared"),
                "via": .string(r.channel.rawValue), "result": .int(result),
            ]))]))
        }
    }

    /// An exit as `expect_exit` and `--json` spell it.
    public static func render(_ exit: VMExit) -> JSON {
        var o = JSONObject()
        o["reason"] = .string(exit.reasonName)
        switch exit {
        case .memoryFault(let flags, let gpa, let size):
            var names: [JSON] = []
            if flags & UAPI.KVM_MEMORY_EXIT_FLAG_PRIVATE != 0 { names.append(.string("private")) }
            let rest = flags & ~UAPI.KVM_MEMORY_EXIT_FLAG_PRIVATE
            if rest != 0 { names.append(.int(rest)) }
            o["flags"] = .array(names)
            o["gpa"] = .int(gpa)
            o["size"] = .int(size)
        case .mmio(let gpa, let length, let isWrite):
            o["gpa"] = .int(gpa)
            o["len"] = .int(length)
            o["is_write"] = .bool(isWrite)
        case .internalError(let sub):
            o["suberror"] = .int(sub)
        case .hypercall(let nr, let args):
            o["nr"] = .int(nr)
            o["args"] = .array(args.map { .int($0) })
        case .shutdown, .other:
            break
        }
        return .object(o)
    }

    // MARK: Checking

    /// Every way `observation` falls short of `step`'s expectations.
    static func check(_ step: Step, _ o: Observation) -> [String] {
        if step.observe { return [] }
        var problems: [String] = []
        let resultOK: Bool
        switch (step.expect, o.result) {
        case (.ok, .ok), (.sigbus, .sigbus), (.sigsegv, .sigsegv), (.exit, .exit): resultOK = true
        // "ok" accepts a normal KVM_RUN exit only when the step says which exit.
        case (.ok, .exit): resultOK = step.expectExit != nil
        case (.errno(let a), .errno(let b)): resultOK = a == b
        default: resultOK = false
        }
        if !resultOK {
            var got = o.result.description
            if let exit = o.exit { got += " " + exit.rendered }
            problems.append("expected \(step.expect), got \(got)")
        }
        if let want = step.expectValue {
            if let got = o.value {
                if !matches(want, got) { problems.append("expected value \(want.rendered), got \(got.rendered)") }
            } else {
                problems.append("expected value \(want.rendered), got no value")
            }
        }
        if let want = step.expectBytes {
            if let got = o.bytes {
                if got != want {
                    let at = zip(got, want).enumerated().first(where: { $0.element.0 != $0.element.1 })?.offset ?? min(got.count, want.count)
                    problems.append("bytes differ at offset \(at): expected \(BytesSyntax.describe(want)), got \(BytesSyntax.describe(got))")
                }
            } else {
                problems.append("expected bytes \(BytesSyntax.describe(want)), got none")
            }
        }
        if let want = step.expectExit {
            if let got = o.exit {
                if !matches(want, got) { problems.append("expected exit \(want.rendered), got \(got.rendered)") }
            } else {
                problems.append("expected exit \(want.rendered), got no exit")
            }
        }
        return problems
    }

    /// Subset match: objects by the expected keys, numbers by value whatever their
    /// spelling, arrays of names as sets.
    public static func matches(_ want: JSON, _ got: JSON) -> Bool {
        switch (want, got) {
        case (.object(let w), .object(let g)):
            return w.keys.allSatisfy { k in g[k].map { matches(w[k]!, $0) } ?? false }
        case (.array(let w), .array(let g)):
            guard w.count == g.count else { return false }
            if w.allSatisfy({ if case .string = $0 { true } else { false } }) {
                return Set(w) == Set(g)
            }
            return zip(w, g).allSatisfy { matches($0, $1) }
        case (_, .number):
            guard let a = NumberSyntax.parse(want), let b = NumberSyntax.parse(got) else { return false }
            return a == b
        default:
            return want == got
        }
    }
}
