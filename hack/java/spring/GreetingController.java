package kite.bench;

import org.springframework.web.bind.annotation.GetMapping;
import org.springframework.web.bind.annotation.RestController;

@RestController
public class GreetingController {
    private final GreetingRepository greetings;

    public GreetingController(GreetingRepository greetings) {
        this.greetings = greetings;
    }

    @GetMapping(value = "/", produces = "application/json")
    public Greeting index() {
        return greetings.find(1);
    }
}
