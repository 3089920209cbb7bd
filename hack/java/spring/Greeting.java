package kite.bench;

/** A row of the greetings table, written as JSON by Jackson (through its getters). */
public class Greeting {
    private final int id;
    private final String text;
    private final String created;

    public Greeting(int id, String text, String created) {
        this.id = id;
        this.text = text;
        this.created = created;
    }

    public int getId() { return id; }
    public String getText() { return text; }
    public String getCreated() { return created; }
    public int getJava() { return Runtime.version().feature(); }
}
