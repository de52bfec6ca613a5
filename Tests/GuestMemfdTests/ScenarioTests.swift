import GMemBackend
import GMemModel
import GMemScenario
import Testing

#if canImport(Glibc)
import Glibc
#endif

func readFile(_ path: String) -> String? {
    guard let f = fopen(path, "rb") else { return nil }
    defer { fclose(f) }
    var bytes: [UInt8] = []
    var buf = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = fread(&buf, 1, buf.count, f)
        bytes.append(contentsOf: buf[0..<n])
        if n < buf.count { break }
    }
    return String(decoding: bytes, as: UTF8.self)
}

func scenarioFiles(_ dir: String) -> [String] {
    guard let d = opendir(dir) else { return [] }
    defer { closedir(d) }
    var names: [String] = []
    while let e = readdir(d) {
        let name = withUnsafePointer(to: e.pointee.d_name) {
            $0.withMemoryRebound(to: CChar.self, capacity: 256) { String(cString: $0) }
        }
        if name.hasSuffix(".json") { names.append(dir + "/" + name) }
    }
    return names.sorted()
}

@Suite("Scenarios")
struct ScenarioTests {
    static let corpus = scenarioFiles(repositoryRoot + "/scenarios") + scenarioFiles(repositoryRoot + "/scenarios/tour")
        + scenarioFiles(repositoryRoot + "/scenarios/mutants")

    @Test func theCorpusIsThere() {
        #expect(Self.corpus.count >= 16)
    }

    @Test(arguments: corpus)
    func everyScenarioPassesOnTheModel(_ path: String) throws {
        let text = try #require(readFile(path))
        let scenario = try ScenarioParser.parse(text: text, file: path)
        // Scenarios of the in-flight series run on the profile that has it.
        let model = ModelBackend(config: scenario.requires.contains(.noDirectMap) ? .next : .mainline, checkTransitions: true)
        let runner = ScenarioRunner(backend: model)
        var failures: [String] = []
        let summary = runner.run(scenario) { r in
            if r.status != .passed { failures.append("step \(r.index) \(r.op): \(r.status) \(r.message ?? "")") }
            // The shipped model never breaks an invariant, at or across any step.
            for v in (try? model.checkInvariants()) ?? [] { failures.append("after step \(r.index) \(r.op): \(v)") }
            model.kernel.checkInvariants()
        }
        #expect(failures.isEmpty, "\(failures.joined(separator: "\n"))")
        #expect(summary.passed == scenario.steps.count)
    }

    @Test("bad files name the file, step and field", arguments: [
        (#"{"name": "x", "steps": [{"op": "nope"}]}"#, "f.json: step 0 (nope): field 'op': unknown op"),
        (#"{"name": "x", "steps": [{"op": "close"}]}"#, "f.json: step 0 (close): field 'fd': missing"),
        (#"{"name": "x", "steps": [{"op": "close", "fd": "ghost"}]}"#, "field 'fd': unknown handle name 'ghost'"),
        (#"{"name": "x", "steps": [{"op": "memfd_create", "size": "12Q"}]}"#, "step 0 (memfd_create): field 'size': expected a number"),
        (#"{"name": "x", "steps": [{"op": "memfd_create", "size": 1, "sise": 2}]}"#, "field 'sise': unknown field"),
        (#"{"name": "x", "steps": [{"op": "memfd_create", "size": 1, "expect": "EWHAT"}]}"#, "field 'expect': expected"),
        (#"{"name": "x", "steps": [{"op": "memfd_create", "size": 1, "as": "m"}, {"op": "munmap", "map": "m"}]}"#,
         "step 1 (munmap): field 'map': 'm' names a fd, expected a map"),
        (#"{"name": "x", "steps": [{"op": "host_write", "map": "m", "bytes": "abc"}]}"#, "field 'map'"),
        (#"{"name": "x", "steps": ["#, "invalid JSON: line 1, column 25"),
        (#"[1, 2]"#, "expected a JSON object"),
        (#"{"steps": []}"#, "field 'name'"),
        (#"{"name": "x", "steps": [{"op": "fstat", "fd": 3, "as": "s"}]}"#, "field 'as': op 'fstat' returns no handle"),
        (#"{"name": "x", "steps": [{"op": "guest_program", "vm": 3, "program": [{"jump": 1}]}]}"#,
         "field 'program[0]': unknown guest op \"jump\""),
        (#"{"name": "x", "steps": [{"op": "guest_program", "vm": 3, "program": [{"fill": {"gpa": 0, "len": 4}}]}]}"#,
         "field 'program[0].fill.pattern'"),
        (#"{"name": "x", "steps": [{"op": "guest_program", "vm": 3, "program": [{"convert": {"gpa": 0, "npages": 1, "to": "x"}}]}]}"#,
         "field 'program[0].convert.to'"),
        (#"{"name": "x", "requires": ["warp_drive"], "steps": []}"#, "field 'requires': unknown feature"),
    ])
    func badFilesAreRejectedPrecisely(text: String, message: String) {
        do {
            _ = try ScenarioParser.parse(text: text, file: "f.json")
            Issue.record("accepted an invalid scenario")
        } catch {
            #expect(error.description.contains(message), "\(error.description)")
        }
    }

    @Test("every mutant is caught by its scenario", arguments: Mutant.allCases.filter { !$0.needsInterleaving })
    func mutantsAreCaught(_ mutant: Mutant) throws {
        let path = repositoryRoot + "/scenarios/mutants/\(mutant.rawValue).json"
        let scenario = try ScenarioParser.parse(text: try #require(readFile(path)), file: path)
        var config = ModelConfig.mainline
        config.mutants = [mutant]
        var caught: [String] = []
        _ = ScenarioRunner(backend: ModelBackend(config: config, checkTransitions: true)).run(scenario) { r in
            if r.op == "check_invariants", r.status == .failed { caught.append(r.message ?? "") }
        }
        #expect(!caught.isEmpty, "\(mutant.rawValue) went unnoticed")
    }

    @Test func theEmbeddedTourMatchesScenariosTour() throws {
        let generated = try #require(readFile(repositoryRoot + "/Sources/gmem/TourScenarios.swift"))
        for path in scenarioFiles(repositoryRoot + "/scenarios/tour") {
            let text = try #require(readFile(path))
            #expect(generated.contains(text), "\(path) changed: run scripts/embed-tour.sh")
        }
        let race = try #require(readFile(repositoryRoot + "/scenarios/explore/gup-fast-vs-to-private.json"))
        #expect(generated.contains(race), "the demo's race changed: run scripts/embed-tour.sh")
    }

    static let numberCases: [(String, UInt64)] = [
        ("4096", 4096), ("0xC0000000", 0xC000_0000), ("4K", 4096), ("2M", 2 << 20), ("1G", 1 << 30),
        ("1T", 1 << 40), ("2^63", 1 << 63), ("2^63-4K", (1 << 63) - 4096), ("-4096", 0 &- 4096),
        ("1G+4K", (1 << 30) + 4096), ("4*2M", 8 << 20), ("2^64-4K", 0 &- 4096), ("18446744073709551615", .max),
    ]

    @Test(arguments: numberCases)
    func numbers(_ text: String, _ value: UInt64) {
        #expect(NumberSyntax.parse(text) == value)
    }

    @Test(arguments: ["", "4Q", "0x", "1..2", "18446744073709551616", "abc", "--", "2^"])
    func badNumbers(_ text: String) {
        #expect(NumberSyntax.parse(text) == nil)
    }

    @Test func jsonParserHandlesEscapesAndRejectsGarbage() throws {
        let v = try JSONParser.parse(#"{"a": "x\u00e9\ud83d\ude00\n", "b": [1, -2.5e3, true, null]}"#)
        #expect(v["a"] == .string("xé😀\n"))
        #expect(v["b"] == .array([.number("1"), .number("-2.5e3"), .bool(true), .null]))
        for bad in ["", "{", "[1,]", "{\"a\" 1}", "01", "\"\\x\"", "tru", String(repeating: "[", count: 500)] {
            #expect(throws: JSONSyntaxError.self) { try JSONParser.parse(bad) }
        }
    }

    @Test func subsetMatchingComparesNumbersByValue() {
        let got = JSON.object(JSONObject(["gpa": .int(3_221_225_472), "flags": .array([.string("private")]), "size": .int(4096)]))
        #expect(ScenarioRunner.matches(.object(JSONObject(["gpa": .string("0xC0000000")])), got))
        #expect(ScenarioRunner.matches(.object(JSONObject(["flags": .array([.string("private")])])), got))
        #expect(!ScenarioRunner.matches(.object(JSONObject(["flags": .array([])])), got))
        #expect(!ScenarioRunner.matches(.object(JSONObject(["missing": .int(1)])), got))
    }
}
