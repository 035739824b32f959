# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require ["fileinto"];
if header :matches "subject" "*[urgent]*" {
  fileinto "yes";
} else {
  fileinto "no";
}
