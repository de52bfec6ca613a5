import GMemBackend
import GMemScenario

/// Prints step reports as people read them, or as JSON lines.
final class Reporter {
    var json: Bool
    var verbose = true
    private var lastSkip: String?

    init(json: Bool) { self.json = json }

    func header(_ scenario: Scenario, backend: String) {
        guard !json else { return }
        emit("== \(scenario.file): \(scenario.name) [\(backend)]")
        if verbose, let d = scenario.description { emit(wrap(d, indent: "   ")) }
    }

    func step(_ r: StepReport, _ step: Step, file: String) {
        if json {
            var o = JSONObject()
            o["file"] = .string(file)
            o["step"] = .int(r.index)
            o["op"] = .string(r.op)
            o["result"] = .string(r.observation?.result.description ?? "skipped")
            o["status"] = .string(r.status.rawValue)
            if let v = r.observation?.value { o["value"] = v }
            if let x = r.observation?.exit { o["exit"] = x }
            if let m = r.message { o["message"] = .string(m) }
            o["backend"] = .string(r.backend)
            emit(JSON.object(o).rendered)
            return
        }
        if verbose, let c = step.comment { emit(wrap(c, indent: "       # ")) }
        let result = r.observation?.result.description ?? "skipped"
        var detail = ""
        if let x = r.observation?.exit { detail = "exit " + human(x) }
        else if let v = r.observation?.value { detail = human(v) }
        if detail.count > 90 { detail = String(detail.prefix(87)) + "..." }
        let idx = String(r.index)
        let line = String(repeating: " ", count: max(0, 4 - idx.count)) + idx + "  "
            + pad(r.op, 26) + pad(result, 10) + detail
        emit(line)
        switch r.status {
        case .passed: break
        case .failed: emit("      FAIL: " + (r.message ?? ""))
        case .skipped:
            if r.message != lastSkip { emit("      skipped: " + (r.message ?? "")) }
        }
        lastSkip = r.status == .skipped ? r.message : nil
    }

    func fileSummary(_ scenario: Scenario, _ s: Summary) {
        guard !json else { return }
        emit("   \(scenario.name): \(s.line)")
        emit("")
    }

    func total(_ s: Summary) {
        if json {
            emit(JSON.object(JSONObject(["summary": .object(JSONObject([
                "passed": .int(s.passed), "failed": .int(s.failed), "skipped": .int(s.skipped),
            ]))])).rendered)
        } else {
            emit(s.line)
        }
    }

    /// JSON for people: numbers of 64 KiB and up (addresses, offsets, sizes) in hex.
    func human(_ v: JSON) -> String {
        switch v {
        case .number(let text):
            if let n = UInt64(text), n >= 0x10000 { return "0x" + String(n, radix: 16) }
            return text
        case .array(let items):
            return "[" + items.map(human).joined(separator: ", ") + "]"
        case .object(let o):
            return "{" + o.keys.map { "\"\($0)\": " + human(o[$0]!) }.joined(separator: ", ") + "}"
        default:
            return v.rendered
        }
    }

    func pad(_ s: String, _ n: Int) -> String {
        s.count >= n ? s + " " : s + String(repeating: " ", count: n - s.count)
    }

    func wrap(_ text: String, indent: String, width: Int = 96) -> String {
        var lines: [String] = []
        var current = ""
        for word in text.split(separator: " ", omittingEmptySubsequences: true) {
            if !current.isEmpty && current.count + word.count + 1 > width - indent.count {
                lines.append(indent + current)
                current = ""
            }
            current += current.isEmpty ? String(word) : " " + word
        }
        if !current.isEmpty { lines.append(indent + current) }
        return lines.joined(separator: "\n")
    }
}
